"""Phantom samples: spatial maps of (strain, omega, chi) that imitate real films, and their scans.

:func:`fig3_phantom` builds the kind of map the seed's Fig. 3 shows: strain domains as a 2D
sinusoid, and substrate step edges as sigmoidal steps in both tilts (omega steps along one
direction, chi along another, so the three maps are easy to tell apart). :func:`simulate_scan`
turns a phantom into the counts a scan would record. The simulated detector and the Tiled example
datasets use the same two functions, so everything that shows a phantom shows the same sample.

Scan geometry: pixel (row, col) of a map is the stage position x = origin_x + col * pixel_size,
y = origin_y + row * pixel_size (micrometres); ``scan_y`` runs along y, ``scan_x`` along x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from .errors import InputError
from .physics import Instrument, simulate, to_counts

__all__ = ["Phantom", "fig3_phantom", "simulate_scan"]


@dataclass(frozen=True, eq=False)
class Phantom:
    """(strain, omega, chi) maps over a scan grid.

    Attributes:
        strain: strain epsilon, dimensionless, (scan_y, scan_x).
        omega_deg: tilt in the scattering plane, degrees, (scan_y, scan_x).
        chi_deg: tilt out of the scattering plane, degrees, (scan_y, scan_x).
        pixel_size_um: scan step in micrometres (the same along x and y).
        origin_um: stage position (x, y) of map pixel (0, 0), micrometres.
        description: what the phantom is, for metadata.
    """

    strain: np.ndarray
    omega_deg: np.ndarray
    chi_deg: np.ndarray
    pixel_size_um: float = 0.05
    origin_um: tuple[float, float] = (0.0, 0.0)
    description: str = ""

    def __post_init__(self) -> None:
        arrays = [np.asarray(getattr(self, n), dtype=np.float64) for n in ("strain", "omega_deg", "chi_deg")]
        if arrays[0].ndim != 2 or any(a.shape != arrays[0].shape for a in arrays):
            raise InputError(
                "strain, omega_deg and chi_deg must be 2-D maps of one shape (scan_y, scan_x), got "
                f"{[a.shape for a in arrays]}"
            )
        if not all(np.isfinite(a).all() for a in arrays):
            raise InputError("phantom maps must be finite")
        if not self.pixel_size_um > 0:
            raise InputError(f"pixel_size_um must be positive, got {self.pixel_size_um!r}")
        for name, arr in zip(("strain", "omega_deg", "chi_deg"), arrays, strict=True):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def shape(self) -> tuple[int, int]:
        """(scan_y, scan_x)."""
        n_y, n_x = self.strain.shape
        return n_y, n_x

    @property
    def x_um(self) -> np.ndarray:
        """Stage x of each map column, micrometres."""
        return self.origin_um[0] + self.pixel_size_um * np.arange(self.shape[1])

    @property
    def y_um(self) -> np.ndarray:
        """Stage y of each map row, micrometres."""
        return self.origin_um[1] + self.pixel_size_um * np.arange(self.shape[0])

    def parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flattened (strain, omega_deg, chi_deg), row-major, ready for ``simulate``."""
        return self.strain.ravel(), self.omega_deg.ravel(), self.chi_deg.ravel()

    def values_at(self, x_um, y_um, *, method: str = "linear") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(strain, omega_deg, chi_deg) at stage positions, e.g. where a fly scan triggered a frame.

        Args:
            x_um, y_um: stage positions in micrometres (scalars or arrays that broadcast).
            method: ``"linear"`` (bilinear between map pixels) or ``"nearest"``.

        Positions outside the map take the value at the nearest edge (the stage may overshoot).
        At a pixel's own position both methods return that pixel's values.
        """
        if method not in ("linear", "nearest"):
            raise InputError(f"method must be 'linear' or 'nearest', got {method!r}")
        x, y = np.broadcast_arrays(np.asarray(x_um, dtype=np.float64), np.asarray(y_um, dtype=np.float64))
        col = np.clip((x - self.origin_um[0]) / self.pixel_size_um, 0, self.shape[1] - 1)
        row = np.clip((y - self.origin_um[1]) / self.pixel_size_um, 0, self.shape[0] - 1)
        if method == "nearest":
            r, c = np.rint(row).astype(int), np.rint(col).astype(int)
            return self.strain[r, c], self.omega_deg[r, c], self.chi_deg[r, c]
        r0 = np.minimum(np.floor(row).astype(int), max(self.shape[0] - 2, 0))
        c0 = np.minimum(np.floor(col).astype(int), max(self.shape[1] - 2, 0))
        r1 = np.minimum(r0 + 1, self.shape[0] - 1)
        c1 = np.minimum(c0 + 1, self.shape[1] - 1)
        fr, fc = row - r0, col - c0

        def bilinear(m: np.ndarray) -> np.ndarray:
            return (1 - fr) * ((1 - fc) * m[r0, c0] + fc * m[r0, c1]) + fr * (
                (1 - fc) * m[r1, c0] + fc * m[r1, c1]
            )

        return bilinear(self.strain), bilinear(self.omega_deg), bilinear(self.chi_deg)

    def to_dataset(self) -> xr.Dataset:
        """The maps as an ``xarray.Dataset`` (dims scan_y, scan_x; stage coordinates in um)."""
        dims = ("scan_y", "scan_x")
        return xr.Dataset(
            {
                "strain": (dims, self.strain, {"units": "1", "long_name": "strain (truth)"}),
                "omega": (dims, self.omega_deg, {"units": "deg", "long_name": "omega (truth)"}),
                "chi": (dims, self.chi_deg, {"units": "deg", "long_name": "chi (truth)"}),
            },
            coords={
                "scan_y": np.arange(self.shape[0]),
                "scan_x": np.arange(self.shape[1]),
                "y_um": ("scan_y", self.y_um, {"units": "um"}),
                "x_um": ("scan_x", self.x_um, {"units": "um"}),
            },
            attrs={"description": self.description, "pixel_size_um": self.pixel_size_um},
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _staircase(r: np.ndarray, n_steps: int, width: float) -> np.ndarray:
    """0 -> 1 in ``n_steps`` equal sigmoidal steps along r, edges placed so terraces have equal areas."""
    edges = np.quantile(r, (np.arange(n_steps) + 1) / (n_steps + 1))
    # a zero array to start from keeps the sum an array (0 + x is exact, so the values are unchanged)
    return sum((_sigmoid((r - e) / width) for e in edges), start=np.zeros_like(r)) / n_steps


def fig3_phantom(
    size: int | tuple[int, int] = 165,
    *,
    instrument: Instrument = Instrument(),
    pixel_size_um: float = 0.05,
    fill: float = 0.8,
    domain_periods: float = 1.5,
    omega_steps: int = 2,
    chi_steps: int = 2,
    step_width: float = 0.02,
    omega_edge_angle_deg: float = 30.0,
    chi_edge_angle_deg: float = 110.0,
) -> Phantom:
    """A Fig. 3-style sample: strain domains and substrate step edges.

    * strain: a 2D sinusoid, centre + A sin(2 pi p u) sin(2 pi p v) over the map's unit
      coordinates (u, v), ``domain_periods`` = p periods per side (domains of alternating sign);
    * omega: ``omega_steps`` sigmoidal steps along the direction at ``omega_edge_angle_deg`` from x;
    * chi: ``chi_steps`` sigmoidal steps, descending, along ``chi_edge_angle_deg``;
    * the step edges are straight lines placed so that the terraces have equal areas.

    Every map spans ``fill`` (0 < fill <= 1) of the instrument's parameter range around its centre,
    so all values lie inside the library box. ``step_width`` is a sigmoid's width as a fraction of
    the map side (0.02: about 3 pixels at 165).
    """
    n_y, n_x = (size, size) if isinstance(size, (int, np.integer)) else size
    if n_y < 1 or n_x < 1:
        raise InputError(f"size must be positive, got {size!r}")
    if not 0 < fill <= 1:
        raise InputError(f"fill must be in (0, 1], got {fill!r}")
    if step_width <= 0 or omega_steps < 1 or chi_steps < 1:
        raise InputError("step_width must be positive and omega_steps, chi_steps at least 1")
    side = max(n_y, n_x) - 1 or 1
    v, u = np.meshgrid(np.arange(n_y) / side, np.arange(n_x) / side, indexing="ij")
    ranges = instrument.parameter_ranges
    centre = {k: 0.5 * (lo + hi) for k, (lo, hi) in ranges.items()}
    half = {k: 0.5 * fill * (hi - lo) for k, (lo, hi) in ranges.items()}

    strain = centre["strain"] + half["strain"] * (
        np.sin(2 * math.pi * domain_periods * u) * np.sin(2 * math.pi * domain_periods * v)
    )

    def along(angle_deg: float) -> np.ndarray:
        a = math.radians(angle_deg)
        r = u * math.cos(a) + v * math.sin(a)
        return (r - r.min()) / (np.ptp(r) or 1.0)

    omega = centre["omega"] + half["omega"] * (
        2 * _staircase(along(omega_edge_angle_deg), omega_steps, step_width) - 1
    )
    chi = centre["chi"] - half["chi"] * (2 * _staircase(along(chi_edge_angle_deg), chi_steps, step_width) - 1)
    return Phantom(
        strain,
        omega,
        chi,
        pixel_size_um=pixel_size_um,
        description=(
            f"fig3 phantom {n_y}x{n_x}: strain 2D sinusoid ({domain_periods} periods), "
            f"{omega_steps} omega and {chi_steps} chi sigmoidal steps, fill {fill}"
        ),
    )


def simulate_scan(
    phantom: Phantom,
    instrument: Instrument = Instrument(),
    max_counts: float = 7.0,
    rng: np.random.Generator | int | None = None,
    *,
    noise: bool = True,
    upsample: int | None = None,
    chunk_size: int = 4096,
    progress: bool = True,
) -> np.ndarray:
    """The frames a scan of ``phantom`` records: float32 (scan_y, scan_x, F, F).

    Counts follow the library-wide convention (physics.md): expected counts = max_counts *
    intensity, the Laue maximum of a fully lit pixel being 1 (``to_counts(..., scale=1.0)``),
    then Poisson noise. ``noise=False`` returns the expected counts instead. The draws depend only
    on ``rng``, not on ``chunk_size``.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if not max_counts > 0:
        raise InputError(f"max_counts must be positive, got {max_counts!r}")
    strain, omega, chi = phantom.parameters()
    n_pix = instrument.frame_pixels
    out = np.empty((len(strain), n_pix, n_pix), dtype=np.float32)
    for start in tqdm(range(0, len(strain), chunk_size), desc="scan", disable=not progress):
        stop = start + chunk_size
        frames = simulate(
            strain[start:stop], omega[start:stop], chi[start:stop], instrument, upsample=upsample
        )
        if noise:
            out[start:stop] = to_counts(frames, max_counts, scale=1.0, rng=rng)
        else:
            out[start:stop] = frames * np.float32(max_counts)
    return out.reshape(*phantom.shape, n_pix, n_pix)
