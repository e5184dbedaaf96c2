"""Frames that depart from the ideal simulation the way real ones do, with their truth.

The robustness benchmark and the trust tests draw on these: a film of another thickness, a
background, hot pixels, a module gap, a beam-centre offset, count levels far from 7, the film
seen at another energy (another material, as far as the frames go), and frames with no ring at
all. Each returns Poisson counts (N, F, F) in physics.md's frame, the true parameters where there
are any, and the instrument that really made the frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .physics import Instrument, simulate, simulate_roi, to_counts

__all__ = ["DEPARTURES", "Departure", "DepartureFrames", "random_parameters"]

#: Sub-pixels per binned pixel of the departure frames: near-exact pixel integration, finer than
#: the 8 x 8 the models were trained on.
UPSAMPLE = 32


@dataclass
class DepartureFrames:
    """Frames of one departure.

    Attributes:
        counts: float32 (N, F, F) Poisson counts in physics.md's frame.
        params: (N, 3) true strain, omega, chi (deg), or None for frames with nothing to measure.
        instrument: the instrument that made the frames (thickness, energy as departed).
        max_counts: expected counts of a fully lit pixel at the Laue maximum.
        background: flat background in counts per binned pixel.
        mask: bool (F, F) pixels a user would declare masked (their values are broken), or None.
        declared: the instrument a user would describe (a calibrated beam-centre offset or
            film), or None for the model's own.
        thickness_angstrom: (N,) each frame's film where it varies over the scan, else None (the
            film is ``instrument``'s).
    """

    counts: np.ndarray
    params: np.ndarray | None
    instrument: Instrument
    max_counts: float = 7.0
    background: float = 0.0
    mask: np.ndarray | None = None
    declared: Instrument | None = None
    thickness_angstrom: np.ndarray | None = None

    def film_angstrom(self) -> np.ndarray:
        """(N,) each frame's true film thickness (Å)."""
        if self.thickness_angstrom is not None:
            return self.thickness_angstrom
        return np.full(len(self.counts), self.instrument.film_thickness_angstrom)


@dataclass(frozen=True)
class Departure:
    """A named way of making frames: ``make(n, rng, instrument) -> DepartureFrames``."""

    name: str
    group: str
    make: Callable[[int, np.random.Generator, Instrument], DepartureFrames] = field(repr=False)


def random_parameters(instrument: Instrument, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) parameters uniform over the instrument's box."""
    return np.stack([rng.uniform(lo, hi, n) for lo, hi in instrument.parameter_ranges.values()], 1)


def _ideal(
    n: int,
    rng: np.random.Generator,
    inst: Instrument,
    *,
    max_counts: float = 7.0,
    background: float = 0.0,
    thickness: float | None = None,
    energy: float | None = None,
    declare_film: bool = False,
    film_range: tuple[float, float] | None = None,
) -> DepartureFrames:
    """Frames at a count level, background, film and energy; ``declare_film``: the user's instrument
    says the film (calibrated); ``film_range``: each frame's film uniform in it (Å)."""
    real = inst
    if thickness is not None:
        real = real.replace(film_thickness_angstrom=thickness)
    if energy is not None:
        real = real.replace(energy_kev=energy)
    params = random_parameters(inst, n, rng)
    strain, omega, chi = params.T
    films = None if film_range is None else rng.uniform(*film_range, n)
    frames = simulate(strain, omega, chi, real, upsample=UPSAMPLE, thickness_angstrom=films)
    counts = rng.poisson(max_counts * frames + background).astype(np.float32)
    declared = real if declare_film else None
    return DepartureFrames(
        counts, params, real, max_counts, background, declared=declared, thickness_angstrom=films
    )


def _gradient(n: int, rng: np.random.Generator, inst: Instrument, *, top: float) -> DepartureFrames:
    """A background rising linearly across the columns from 0 to ``top`` counts per binned pixel
    (air scatter or fluorescence from one side): the forward model's background is flat."""
    params = random_parameters(inst, n, rng)
    strain, omega, chi = params.T
    f = inst.frame_pixels
    ramp = np.broadcast_to(np.linspace(0.0, top, f)[None, :], (f, f))
    expected = 7.0 * simulate(strain, omega, chi, inst, upsample=UPSAMPLE) + ramp
    counts = rng.poisson(expected).astype(np.float32)
    return DepartureFrames(counts, params, inst, 7.0, top / 2)


def _hot(n: int, rng: np.random.Generator, inst: Instrument, *, pixels: int) -> DepartureFrames:
    out = _ideal(n, rng, inst)
    f = inst.frame_pixels
    for frame in out.counts:
        where = rng.choice(f * f, pixels, replace=False)
        frame.reshape(-1)[where] = rng.uniform(30, 3000, pixels).round()  # stuck-high pixels
    return out


def _gap(n: int, rng: np.random.Generator, inst: Instrument, *, declared: bool) -> DepartureFrames:
    """A dead row and column crossing the annulus (a module gap), reading zero; ``declared``: the
    user's mask says so."""
    out = _ideal(n, rng, inst)
    mask = np.zeros((inst.frame_pixels,) * 2, dtype=bool)
    mask[40, :] = True
    mask[:, 24] = True
    out.counts[:, mask] = 0.0
    out.mask = mask if declared else None
    return out


def _offset(
    n: int, rng: np.random.Generator, inst: Instrument, *, pixels: float, declared: bool = False
) -> DepartureFrames:
    """The beam centre off the ROI centre by ``pixels`` binned pixels along rows and columns;
    ``declared``: the user's instrument says so (calibrated)."""
    raw_shift = round(pixels * inst.binning)
    margin = inst.binning * 4
    wide = inst.replace(roi_pixels=inst.roi_pixels + 2 * margin)
    params = random_parameters(inst, n, rng)
    strain, omega, chi = params.T
    raw = simulate_roi(strain, omega, chi, wide, upsample=UPSAMPLE)
    lo = margin - raw_shift  # the pattern moves by +raw_shift in rows and columns
    roi = inst.roi_pixels
    cut = raw[:, lo : lo + roi, lo : lo + roi]
    binned = cut.reshape(n, roi // inst.binning, inst.binning, roi // inst.binning, inst.binning).mean((2, 4))
    counts = to_counts(binned, 7.0, scale=1.0, rng=rng)
    told = inst.replace(beam_centre_offset_px=(pixels, pixels)) if declared else None
    return DepartureFrames(counts, params, inst, declared=told)


def _no_ring(n: int, rng: np.random.Generator, inst: Instrument, *, kind: str) -> DepartureFrames:
    f = inst.frame_pixels
    if kind == "blank":
        counts = np.zeros((n, f, f), np.float32)
    elif kind == "flat field":
        counts = rng.poisson(3.0, (n, f, f)).astype(np.float32)
    else:  # detector noise: sparse single counts and a few bright specks
        counts = rng.poisson(0.4, (n, f, f)).astype(np.float32)
    return DepartureFrames(counts, None, inst)


def _registry() -> list[Departure]:
    # partial, not lambdas with default arguments: the type checker sees each ``make`` signature
    rows = [Departure("ideal, 7 counts", "reference", _ideal)]
    for t in (90.0, 100.0, 113.0, 121.0, 135.0, 150.0):
        rows.append(Departure(f"film {t:g} A (instrument: 117 A)", "thickness", partial(_ideal, thickness=t)))
    for t in (90.0, 100.0, 135.0, 150.0):
        rows.append(
            Departure(
                f"film {t:g} A, calibrated (instrument: {t:g} A)",
                "thickness",
                partial(_ideal, thickness=t, declare_film=True),
            )
        )
    rows.append(
        Departure(
            "film varying 95-140 A over the scan (instrument: 117 A)",
            "thickness",
            partial(_ideal, film_range=(95.0, 140.0)),
        )
    )
    for b in (0.02, 0.05, 0.1):
        rows.append(
            Departure(f"flat background {b:g} counts/pixel", "background", partial(_ideal, background=b))
        )
    for top in (0.1, 0.2):
        rows.append(
            Departure(
                f"background rising 0-{top:g} counts/pixel across the frame",
                "background",
                partial(_gradient, top=top),
            )
        )
    for k in (1, 5):
        rows.append(
            Departure(
                f"{k} hot pixel{'s' if k > 1 else ''} (30-3000 counts)", "detector", partial(_hot, pixels=k)
            )
        )
    for declared, how in ((False, "undeclared"), (True, "declared in the mask")):
        rows.append(Departure(f"dead row and column, {how}", "detector", partial(_gap, declared=declared)))
    for px in (0.5, 1.0):
        for declared, how in ((False, "undeclared"), (True, "calibrated in the instrument")):
            rows.append(
                Departure(
                    f"beam centre off by {px:g} binned pixel, {how}",
                    "detector",
                    partial(_offset, pixels=px, declared=declared),
                )
            )
    for level in (1.0, 3.5, 14.0, 70.0, 700.0, 1000.0):
        rows.append(
            Departure(
                f"{level:g} counts at the Laue maximum", "count level", partial(_ideal, max_counts=level)
            )
        )
    for e in (10.8, 11.8):
        rows.append(
            Departure(
                f"the film at {e:g} keV (another material's frames)", "material", partial(_ideal, energy=e)
            )
        )
    for kind in ("blank", "flat field", "noise"):
        rows.append(Departure(f"{kind} frames", "no ring", partial(_no_ring, kind=kind)))
    return rows


#: Every departure of the robustness benchmark, in its table's order.
DEPARTURES: list[Departure] = _registry()
