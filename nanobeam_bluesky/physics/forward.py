"""Forward model of physics.md: a convergent zone-plate beam reflected by an epitaxial film.

Two implementations of the same page:

* :func:`simulate_exact` is the reference. It follows physics.md one detector sub-pixel at a time in
  float64: outgoing direction, mirror back to the incident ray, zone-plate annulus test, Laue
  intensity, then the sub-pixel average.
* :func:`simulate` is the fast path used everywhere else. It computes the same sub-pixel annulus
  membership exactly but per detector sub-row (a detector row maps to a line on the zone plate, so
  the annulus is an interval that a quadratic gives), keeps only the first moments of the mask in
  each pixel, and expands the Laue intensity (smooth on the pixel scale: its central lobe spans
  tens of pixels) to first order about each pixel centre. The annulus depends on the tilts only, so
  frames sharing (omega, chi), as on a library grid, share that work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .instrument import Instrument

__all__ = [
    "as_parameters",
    "iter_grid",
    "lab_geometry",
    "simulate",
    "simulate_exact",
    "simulate_roi",
    "simulate_tensor",
]

# Frames processed together by the fast path, and pairs of tilts per mask batch (bounds memory).
_FRAME_CHUNK = 4096
_PAIR_CHUNK = 128


@dataclass(frozen=True)
class _LabGeometry:
    k_out0: np.ndarray
    e_col: np.ndarray
    e_row: np.ndarray
    theta_b: float


def lab_geometry(instrument: Instrument) -> _LabGeometry:
    """Central reflected ray and detector axes of physics.md (lab frame, unit vectors)."""
    theta = instrument.bragg_angle_rad
    return _LabGeometry(
        k_out0=np.array([0.0, math.sin(2 * theta), math.cos(2 * theta)]),
        e_col=np.array([0.0, math.cos(2 * theta), -math.sin(2 * theta)]),
        e_row=np.array([1.0, 0.0, 0.0]),
        theta_b=theta,
    )


def as_parameters(strain, omega_deg, chi_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcast scalars or 1-D arrays of one length N to three float64 arrays of length N."""
    arrays = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (strain, omega_deg, chi_deg)]
    for name, arr in zip(("strain", "omega_deg", "chi_deg"), arrays, strict=False):
        if arr.ndim != 1:
            raise InputError(f"{name} must be a scalar or a 1-D array, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} contains non-finite values")
    lengths = {len(a) for a in arrays if len(a) != 1}
    if len(lengths) > 1:
        raise InputError(
            f"strain, omega_deg and chi_deg must have one common length, got {[len(a) for a in arrays]}"
        )
    n = lengths.pop() if lengths else 1
    strain, omega, chi = (np.broadcast_to(a, (n,)).copy() for a in arrays)
    if np.any(strain <= -1):
        raise InputError("strain must be > -1 (c' = c (1 + strain) must stay positive)")
    return strain, omega, chi


def _normals(omega_deg: np.ndarray, chi_deg: np.ndarray, theta_b: float) -> np.ndarray:
    """Tilted film normals n (N, 3) of physics.md."""
    omega = np.radians(omega_deg)
    chi = np.radians(chi_deg)
    return np.stack(
        [
            np.sin(chi),
            np.cos(chi) * np.cos(theta_b + omega),
            -np.cos(chi) * np.sin(theta_b + omega),
        ],
        axis=-1,
    )


def _resolve_upsample(instrument: Instrument, upsample: int | None) -> int:
    s = instrument.upsample if upsample is None else upsample
    if not isinstance(s, (int, np.integer)) or s < 1:
        raise InputError(f"upsample must be a positive integer, got {upsample!r}")
    return int(s)


# ------------------------------------------------------------------------------- exact reference
def simulate_exact(
    strain,
    omega_deg,
    chi_deg,
    instrument: Instrument = Instrument(),
    *,
    upsample: int | None = None,
    frame_pixels: int | None = None,
    pixel_m: float | None = None,
) -> np.ndarray:
    """Reference implementation of physics.md, one sub-pixel at a time (float64, slow).

    Returns float32 frames (N, F, F), F = ``frame_pixels`` (binned frame by default).
    """
    strain, omega, chi = as_parameters(strain, omega_deg, chi_deg)
    s = _resolve_upsample(instrument, upsample)
    n_pix = instrument.frame_pixels if frame_pixels is None else frame_pixels
    delta = instrument.binned_pixel_m if pixel_m is None else pixel_m
    geo = lab_geometry(instrument)
    dt = torch.float64
    f = instrument.effective_focal_length_m
    r_in, r_out = instrument.central_stop_diameter_m / 2, instrument.zone_plate_diameter_m / 2
    k = instrument.k_inv_angstrom
    thickness = instrument.film_thickness_angstrom

    sub = (torch.arange(n_pix * s, dtype=dt) + 0.5) / s - n_pix / 2  # sub-pixel centres, pixels
    u = (sub * delta)[None, :]  # along columns
    v = (sub * delta)[:, None]  # along rows
    k_out0, e_col, e_row = (torch.as_tensor(a, dtype=dt) for a in (geo.k_out0, geo.e_col, geo.e_row))
    w = instrument.detector_distance_m * k_out0[None, None, :] + u[..., None] * e_col + v[..., None] * e_row
    d = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)  # (S, S, 3)

    normals = torch.as_tensor(_normals(omega, chi, geo.theta_b), dtype=dt)
    g_vec = 2 * math.pi * instrument.reflection_l / (instrument.lattice_c_angstrom * (1 + strain))
    out = np.empty((len(strain), n_pix, n_pix), dtype=np.float32)
    chunk = max(1, 2_000_000 // d[..., 0].numel())
    for start in range(0, len(strain), chunk):
        n = normals[start : start + chunk, None, None, :]  # (B, 1, 1, 3)
        dn = (d[None] * n).sum(-1)  # (B, S, S)
        k_in = d[None] - 2 * dn[..., None] * n
        px = -f * k_in[..., 0] / k_in[..., 2]
        py = -f * k_in[..., 1] / k_in[..., 2]
        radius = torch.sqrt(px**2 + py**2)
        lit = (radius >= r_in) & (radius <= r_out)
        q = 2 * k * dn
        g = torch.as_tensor(g_vec[start : start + chunk], dtype=dt)[:, None, None]
        x = thickness * (q - g) / 2
        laue = torch.sinc(x / math.pi) ** 2
        intensity = torch.where(lit, laue, torch.zeros((), dtype=dt))
        b = intensity.shape[0]
        binned = intensity.reshape(b, n_pix, s, n_pix, s).mean(dim=(2, 4))
        out[start : start + b] = binned.numpy().astype(np.float32)
    return out


# ------------------------------------------------------------------------------- fast path
@dataclass(frozen=True)
class _PixelGrid:
    """Pixel centres and fixed geometry of one detector sampling (pixel units from the centre)."""

    n_pix: int
    delta: float
    s: int

    @property
    def centres(self) -> np.ndarray:
        return np.arange(self.n_pix) + 0.5 - self.n_pix / 2


def _mask_moments(
    normals: np.ndarray, instrument: Instrument, grid: _PixelGrid, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-pixel-sampled annulus mask per pixel: fraction lit and its first moments.

    Returns (m0, mu, mv), each float32 (P, F, F): mean over the pixel's s x s sub-pixels of
    ``lit``, ``lit * du`` and ``lit * dv`` (du, dv offsets from the pixel centre, in pixels).
    """
    geo = lab_geometry(instrument)
    f = instrument.effective_focal_length_m
    radius_out = instrument.zone_plate_diameter_m / 2 / f  # radii over f (angles)
    radius_in = instrument.central_stop_diameter_m / 2 / f
    n_pix, delta, s = grid.n_pix, grid.delta, grid.s
    n_sub = n_pix * s

    n = torch.as_tensor(normals, dtype=torch.float64, device=device)  # (P, 3)

    def householder(vec: np.ndarray) -> torch.Tensor:
        vec_t = torch.as_tensor(vec, dtype=torch.float64, device=device)
        return vec_t - 2 * (n @ vec_t)[:, None] * n  # (P, 3)

    # H w = A + U B + V C, with U, V in pixels; k_in is parallel to H w.
    a_vec = instrument.detector_distance_m * householder(geo.k_out0)
    b_vec = delta * householder(geo.e_col)
    c_vec = delta * householder(geo.e_row)
    v_sub = (torch.arange(n_sub, dtype=torch.float64, device=device) + 0.5) / s - n_pix / 2  # (T,)
    a_rows = a_vec[:, None, :] + v_sub[None, :, None] * c_vec[:, None, :]  # (P, T, 3)
    bx, by, bz = (b_vec[:, i, None] for i in range(3))
    ax, ay, az = a_rows.unbind(-1)

    first_col = torch.arange(n_pix, dtype=torch.float32, device=device) * s  # first sub-column
    last_col = first_col + (s - 1)

    def counts(radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Lit sub-columns of each sub-row: |p| <= radius f  <=>  quadratic in U <= 0.
        r2 = radius * radius
        q2 = bx * bx + by * by - r2 * bz * bz
        q1 = 2 * (ax * bx + ay * by - r2 * az * bz)
        q0 = ax * ax + ay * ay - r2 * az * az
        disc = q1 * q1 - 4 * q2 * q0
        root = torch.sqrt(torch.clamp(disc, min=0))
        u_lo = (-q1 - root) / (2 * q2)
        u_hi = (-q1 + root) / (2 * q2)
        # Sub-column index g has centre U = (g + 0.5) / s - F / 2.
        g_lo = torch.ceil((u_lo + n_pix / 2) * s - 0.5).clamp(-1, n_sub)
        g_hi = torch.floor((u_hi + n_pix / 2) * s - 0.5).clamp(-1, n_sub)
        empty = disc <= 0
        g_lo = torch.where(empty, torch.ones_like(g_lo), g_lo).float()[..., None]
        g_hi = torch.where(empty, torch.zeros_like(g_hi), g_hi).float()[..., None]
        lo = torch.maximum(g_lo, first_col)
        hi = torch.minimum(g_hi, last_col)
        count = torch.clamp(hi - lo + 1, min=0)  # (P, T, F)
        # Sum of sub-column offsets (m + 0.5) / s - 0.5 for m = lo..hi within the pixel.
        moment = count * ((lo + hi - 2 * first_col + 1) / (2 * s) - 0.5)
        return count, moment

    count_out, moment_out = counts(radius_out)
    count_in, moment_in = counts(radius_in)
    lit = count_out - count_in
    lit_u = moment_out - moment_in
    p = len(normals)
    lit = lit.reshape(p, n_pix, s, n_pix)
    row_offset = ((torch.arange(s, dtype=torch.float32, device=device) + 0.5) / s - 0.5)[None, None, :, None]
    norm = 1.0 / (s * s)
    m0 = lit.sum(2) * norm
    mv = (lit * row_offset).sum(2) * norm
    mu = lit_u.reshape(p, n_pix, s, n_pix).sum(2) * norm
    return m0, mu, mv


def _laue_fields(
    normals: np.ndarray, instrument: Instrument, grid: _PixelGrid, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q - G0 at pixel centres and dq/dU, dq/dV (1/Angstrom per pixel), float32 (P, F, F).

    q = 2 k (w . n) / |w|, with w the unnormalised outgoing direction and G0 = 2 pi l / c.
    """
    geo = lab_geometry(instrument)
    n = torch.as_tensor(normals, dtype=torch.float64, device=device)
    alpha, beta, gamma = (
        n @ torch.as_tensor(v, dtype=torch.float64, device=device) for v in (geo.k_out0, geo.e_col, geo.e_row)
    )
    centres = torch.as_tensor(grid.centres, dtype=torch.float64, device=device)
    big_u = centres[None, None, :] * grid.delta  # metres along columns
    big_v = centres[None, :, None] * grid.delta
    r_det = instrument.detector_distance_m
    inv_w = 1.0 / torch.sqrt(r_det**2 + big_u**2 + big_v**2)
    alpha, beta, gamma = (t[:, None, None] for t in (alpha, beta, gamma))
    wn = r_det * alpha + big_u * beta + big_v * gamma
    two_k = 2 * instrument.k_inv_angstrom
    g0 = 2 * math.pi * instrument.reflection_l / instrument.lattice_c_angstrom
    dq = two_k * wn * inv_w - g0
    dq_du = two_k * grid.delta * (beta * inv_w - wn * big_u * inv_w**3)
    dq_dv = two_k * grid.delta * (gamma * inv_w - wn * big_v * inv_w**3)
    return dq.float(), dq_du.float(), dq_dv.float()


def _sinc2_and_slope(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sinc(x)^2 and its derivative, with sinc(x) = sin(x) / x (x in radians)."""
    small = x.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(x), x)
    sinc = torch.where(small, 1 - x * x / 6, torch.sin(safe) / safe)
    dsinc = torch.where(small, -x / 3, (torch.cos(safe) - sinc) / safe)
    return sinc * sinc, 2 * sinc * dsinc


def _tilt_fields(
    normals: np.ndarray, instrument: Instrument, grid: _PixelGrid, device: torch.device = torch.device("cpu")
) -> list[torch.Tensor]:
    """Everything a frame needs that depends on the tilts only: mask moments and q fields."""
    pieces = []
    for p0 in range(0, len(normals), _PAIR_CHUNK):
        sub = normals[p0 : p0 + _PAIR_CHUNK]
        pieces.append(
            _mask_moments(sub, instrument, grid, device) + _laue_fields(sub, instrument, grid, device)
        )
    return [torch.cat(parts) for parts in zip(*pieces, strict=False)]


def _render(
    fields: list[torch.Tensor],
    idx: torch.Tensor,
    strain: np.ndarray,
    instrument: Instrument,
    thickness: np.ndarray | None = None,
) -> torch.Tensor:
    """Frames for strains ``strain`` whose tilts are ``fields[.][idx]``; ``thickness`` (Å, one
    per frame) replaces the instrument's film thickness."""
    m0, mu, mv, dq, dq_du, dq_dv = fields
    g0 = 2 * math.pi * instrument.reflection_l / instrument.lattice_c_angstrom
    g_shift = 2 * math.pi * instrument.reflection_l / (instrument.lattice_c_angstrom * (1 + strain))
    shift = torch.as_tensor(g_shift - g0, dtype=torch.float32, device=m0.device)[:, None, None]
    if thickness is None:
        half_t: float | torch.Tensor = instrument.film_thickness_angstrom / 2
    else:
        half_t = torch.as_tensor(thickness / 2, dtype=torch.float32, device=m0.device)[:, None, None]
    x = half_t * (dq[idx] - shift)
    laue, slope = _sinc2_and_slope(x)
    intensity = laue * m0[idx] + slope * half_t * (dq_du[idx] * mu[idx] + dq_dv[idx] * mv[idx])
    return intensity.clamp_(min=0)


def _simulate_fast(
    strain: np.ndarray,
    omega: np.ndarray,
    chi: np.ndarray,
    instrument: Instrument,
    grid: _PixelGrid,
    device: torch.device = torch.device("cpu"),
    thickness: np.ndarray | None = None,
) -> torch.Tensor:
    n_frames = len(strain)
    out = torch.empty((n_frames, grid.n_pix, grid.n_pix), dtype=torch.float32, device=device)
    tilts, pair_of_frame = np.unique(np.stack([omega, chi], axis=1), axis=0, return_inverse=True)
    pair_of_frame = pair_of_frame.reshape(-1)
    normals = _normals(tilts[:, 0], tilts[:, 1], instrument.bragg_angle_rad)
    order = np.argsort(pair_of_frame, kind="stable")  # frames sharing tilts sit together
    for start in range(0, n_frames, _FRAME_CHUNK):
        frames = order[start : start + _FRAME_CHUNK]
        pairs, local = np.unique(pair_of_frame[frames], return_inverse=True)
        fields = _tilt_fields(normals[pairs], instrument, grid, device)
        idx = torch.as_tensor(local.reshape(-1), device=device)
        frame_thickness = None if thickness is None else thickness[frames]
        out[torch.as_tensor(frames, device=device)] = _render(
            fields, idx, strain[frames], instrument, frame_thickness
        )
    return out


def iter_grid(
    strain_values,
    omega_values_deg,
    chi_values_deg,
    instrument: Instrument = Instrument(),
    *,
    upsample: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Frames on the product grid, one strain at a time: yields (i, slab (n_omega, n_chi, F, F)).

    The tilt-dependent work is done once for the whole grid, not once per strain.
    """
    strain_values = np.atleast_1d(np.asarray(strain_values, dtype=np.float64))
    omega_values_deg = np.atleast_1d(np.asarray(omega_values_deg, dtype=np.float64))
    chi_values_deg = np.atleast_1d(np.asarray(chi_values_deg, dtype=np.float64))
    s = _resolve_upsample(instrument, upsample)
    grid = _PixelGrid(instrument.frame_pixels, instrument.binned_pixel_m, s)
    omega, chi = (a.ravel() for a in np.meshgrid(omega_values_deg, chi_values_deg, indexing="ij"))
    fields = _tilt_fields(_normals(omega, chi, instrument.bragg_angle_rad), instrument, grid)
    idx = torch.arange(len(omega))
    shape = (len(omega_values_deg), len(chi_values_deg), grid.n_pix, grid.n_pix)
    for i, strain in enumerate(strain_values):
        slab = _render(fields, idx, np.full(len(omega), strain), instrument)
        yield i, slab.numpy().reshape(shape)


def simulate(
    strain,
    omega_deg,
    chi_deg,
    instrument: Instrument = Instrument(),
    *,
    upsample: int | None = None,
    thickness_angstrom: Any = None,
) -> np.ndarray:
    """Noise-free binned frames of physics.md, float32 (N, F, F) with F = 64 by default.

    Args:
        strain: epsilon, dimensionless (scalar or length-N array).
        omega_deg: tilt in the scattering plane, degrees.
        chi_deg: tilt out of the scattering plane, degrees.
        instrument: the instrument; default is physics.md's table.
        upsample: sub-pixels per binned pixel along each axis (``instrument.upsample`` if None).
        thickness_angstrom: the film thickness of each frame, Å (scalar or length-N); None: the
            instrument's ``film_thickness_angstrom``.

    Unnormalised: the annulus times sinc^2, so a fully lit pixel at the Laue maximum is 1 (at any
    thickness: the count scale carries the thickness-squared brightness).
    """
    return simulate_tensor(
        strain, omega_deg, chi_deg, instrument, upsample=upsample, thickness_angstrom=thickness_angstrom
    ).numpy()


def simulate_tensor(
    strain,
    omega_deg,
    chi_deg,
    instrument: Instrument = Instrument(),
    *,
    upsample: int | None = None,
    device: str | torch.device = "cpu",
    thickness_angstrom: Any = None,
) -> torch.Tensor:
    """:func:`simulate` computed on ``device`` and returned there: float32 tensor (N, F, F).

    On a GPU this is what keeps a training pool fed without the CPU (units and arguments as in
    :func:`simulate`).
    """
    strain, omega, chi = as_parameters(strain, omega_deg, chi_deg)
    s = _resolve_upsample(instrument, upsample)
    grid = _PixelGrid(instrument.frame_pixels, instrument.binned_pixel_m, s)
    thickness = _per_frame_thickness(thickness_angstrom, len(strain))
    return _simulate_fast(strain, omega, chi, instrument, grid, torch.device(device), thickness)


def _per_frame_thickness(thickness_angstrom: Any, n: int) -> np.ndarray | None:
    """(n,) float64 film thicknesses in Å, or None for the instrument's."""
    if thickness_angstrom is None:
        return None
    values = np.broadcast_to(np.asarray(thickness_angstrom, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(values) & (values > 0)):
        raise InputError(f"thickness_angstrom must be positive numbers (Å), got {thickness_angstrom!r}")
    return values


def simulate_roi(
    strain,
    omega_deg,
    chi_deg,
    instrument: Instrument = Instrument(),
    *,
    upsample: int | None = None,
    thickness_angstrom: Any = None,
) -> np.ndarray:
    """Noise-free raw detector ROI (N, roi, roi) at the physical pixel size, float32.

    Each raw pixel holds the mean intensity over its area, with the same sub-pixel sampling as
    :func:`simulate` (``upsample / binning`` sub-pixels per raw pixel, at least 1), so binning
    by averaging gives back the binned frames. ``thickness_angstrom`` as for :func:`simulate`.
    """
    strain, omega, chi = as_parameters(strain, omega_deg, chi_deg)
    s = max(1, _resolve_upsample(instrument, upsample) // instrument.binning)
    grid = _PixelGrid(instrument.roi_pixels, instrument.detector_pixel_m, s)
    thickness = _per_frame_thickness(thickness_angstrom, len(strain))
    return _simulate_fast(strain, omega, chi, instrument, grid, thickness=thickness).numpy()
