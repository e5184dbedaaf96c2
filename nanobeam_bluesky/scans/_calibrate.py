"""What the model takes as given, estimated from a scan's own frames (``nanobeam calibrate``).

* **Hot and dead pixels**, from per-pixel statistics of the raw ROIs over the scan (detector
  orientation): a pixel whose total over the scan is far above what its neighbourhood and Poisson
  noise allow is hot; one that reads the same value (zero, or stuck) in every frame while its
  neighbours collect counts is dead. Both go to ``detector_mask_pixels``.
* **Film thickness**, by maximum likelihood over all frames at once through the forward model:
  every frame keeps its own strain, tilts, count scale and background (refitted by the physics
  check's likelihood steps), and one film thickness is shared. Fisher scoring on the pooled
  thickness score (``PhysicsCheck``'s ``thickness_score`` and ``thickness_information``, the other
  parameters refitted) is iterated until the step is a small fraction of its standard error. The
  spread of the film's thickness across the scan is what the per-frame scores vary beyond noise.
* **Count scale and background**: medians (and 5th-95th percentiles) of the per-frame fits at the
  calibrated thickness. The instrument has no field for them; they are reported.
* **Beam centre**: not identifiable from a scan alone. An offset of the pattern is, in every frame,
  a tilt plus a strain (docs/physics.md); over many frames the same constant tilt and strain
  shift absorb it (measured: 1 binned pixel raises the best-fit deviance by 0.002 per frame at
  7 counts, against 0.3 of the model's own approximation). With ``assume_mean_tilt_zero`` it is
  estimated under that explicit assumption: the scan's mean tilt is zero, so the mean position
  of the fitted annulus is the beam centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._schema import FLAG_DTYPE, NO_VALUE, Flag
from ..errors import InputError
from ..inference import inpaint
from ..physics import Instrument, annulus_centre_px
from ..quality import PhysicsCheck
from ._sources import read_spread

if TYPE_CHECKING:
    from ..inference import Predictor

__all__ = ["MIN_CALIBRATION_FRAMES", "Calibration", "calibrate", "find_bad_pixels"]

#: Frames with a measurable ring that a calibration needs by default.
MIN_CALIBRATION_FRAMES = 100
#: Summed neighbour counts over the scan above which a pixel that never changes is called dead
#: (a Poisson pixel expecting that many reads the same value in every frame with p < 1e-13).
_DEAD_MIN_NEIGHBOUR_COUNTS = 30.0


@dataclass
class Calibration:
    """What :func:`calibrate` found.

    Attributes:
        instrument: the base instrument with what was found (thickness, mask pixels, and the
            beam-centre offset when it was estimated).
        base: the instrument the frames were described with before.
        frames: frames read; measured: frames with a ring the fits used.
        hot_pixels, dead_pixels: raw ROI [row, col] indices (detector orientation) found.
        mask: bool (R, R) raw ROI pixels masked in the calibrated instrument (True = masked).
        thickness_angstrom, thickness_sd_angstrom: the maximum-likelihood film thickness and its
            standard error; thickness_spread_angstrom: the film's thickness spread over the scan
            beyond noise (standard deviation; 0 when none is seen), thickness_spread_upper: its
            95 % upper limit.
        count_scale, background: (median, 5th percentile, 95th percentile) over measured frames.
        beam_centre_offset_px, beam_centre_sd_px: (rows, cols) binned pixels, or None when not
            estimated (it needs ``assume_mean_tilt_zero``).
        iterations: scoring steps of the thickness fit.
    """

    instrument: Instrument
    base: Instrument
    frames: int
    measured: int
    hot_pixels: list[tuple[int, int]]
    dead_pixels: list[tuple[int, int]]
    mask: np.ndarray
    thickness_angstrom: float
    thickness_sd_angstrom: float
    thickness_spread_angstrom: float
    thickness_spread_upper: float
    count_scale: tuple[float, float, float]
    background: tuple[float, float, float]
    beam_centre_offset_px: tuple[float, float] | None = None
    beam_centre_sd_px: tuple[float, float] | None = None
    iterations: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines: each estimate with its uncertainty and how many frames it rests on."""
        t = self
        low, high = (
            t.thickness_angstrom - 1.645 * t.thickness_spread_angstrom,
            (t.thickness_angstrom + 1.645 * t.thickness_spread_angstrom),
        )
        lines = [
            f"calibrated from {t.measured} of {t.frames} frames (frames with a measurable ring)",
            f"film thickness: {t.thickness_angstrom:.2f} +- {t.thickness_sd_angstrom:.2f} A "
            f"(was {t.base.film_thickness_angstrom:g}; maximum likelihood, {t.iterations} scoring steps); "
            f"spread over the scan {t.thickness_spread_angstrom:.2f} A sd (95 % upper limit "
            f"{t.thickness_spread_upper:.2f}), 5-95 % range {low:.1f}-{high:.1f} A",
            "count scale (counts at the Laue maximum): median {:.3g}, 5-95 % {:.3g}-{:.3g}".format(
                *t.count_scale
            ),
            "background (counts per binned pixel): median {:.3g}, 5-95 % {:.3g}-{:.3g}".format(*t.background),
            f"hot pixels: {len(t.hot_pixels)}{_list(t.hot_pixels)}; dead pixels: {len(t.dead_pixels)}"
            f"{_list(t.dead_pixels)} (raw ROI [row, col], detector orientation)",
        ]
        if t.beam_centre_offset_px is None:
            lines.append(
                "beam centre: not estimated (a scan alone cannot tell it from a constant tilt; "
                f"kept {list(t.base.beam_centre_offset_px)}; --assume-mean-tilt-zero estimates it)"
            )
        else:
            sd = t.beam_centre_sd_px or (math.nan, math.nan)
            rows, cols = t.beam_centre_offset_px
            lines.append(
                f"beam centre offset: rows {rows:.3f} +- {sd[0]:.3f}, cols {cols:.3f} +- {sd[1]:.3f} "
                "binned pixels, ASSUMING the scan's mean tilt (omega, chi) is zero"
            )
        lines.extend(t.notes)
        return "\n".join(lines)

    def save(self, instrument_path: str | Path, mask_path: str | Path | None = None) -> None:
        """Write the calibrated instrument (YAML or JSON) and, optionally, the mask (.npy, bool
        (R, R), True = masked, raw ROI in the detector's orientation)."""
        path = Path(instrument_path)
        if path.suffix == ".json":
            self.instrument.save(path)
        else:
            header = "".join(f"# {line}\n" for line in ["nanobeam calibrate", *self.summary().splitlines()])
            path.write_text(header + self.instrument.to_yaml())
        if mask_path is not None:
            np.save(Path(mask_path), self.mask)


def _list(pixels: list[tuple[int, int]], most: int = 6) -> str:
    if not pixels:
        return ""
    shown = ", ".join(f"[{r}, {c}]" for r, c in pixels[:most])
    return f" ({shown}{', ...' if len(pixels) > most else ''})"


def find_bad_pixels(raw: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Hot and dead pixels of raw ROIs (N, R, R) from per-pixel statistics over the frames.

    Hot: the pixel's total over the scan exceeds twice the third-highest total of its 8
    neighbours by more than 10 Poisson standard deviations (a real feature -- the annulus, the
    Laue band -- is wider than a pixel, so at least three neighbours share it). Dead: the pixel
    reads the same value in every frame while the median of its neighbours collects at least 30
    counts over the scan. Returns (hot, dead) as sorted [row, col] lists.
    """
    values = np.asarray(raw, dtype=np.float64)
    total = values.sum(axis=0)
    constant = values.max(axis=0) == values.min(axis=0)
    padded = np.pad(total, 1, constant_values=np.nan)
    side_r, side_c = total.shape
    neighbours = np.stack(
        [
            padded[1 + dr : 1 + dr + side_r, 1 + dc : 1 + dc + side_c]
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if dr or dc
        ]
    )
    ordered = np.sort(np.where(np.isnan(neighbours), -np.inf, neighbours), axis=0)  # ascending
    third = np.maximum(ordered[-3], 0.0)
    hot = total > 2 * third + 10 * np.sqrt(third) + 10
    middle = np.nanmedian(neighbours, axis=0)
    dead = constant & (middle >= _DEAD_MIN_NEIGHBOUR_COUNTS) & ~hot
    as_list = lambda m: [(int(r), int(c)) for r, c in np.argwhere(m)]  # noqa: E731
    return as_list(hot), as_list(dead)


def calibrate(
    frames: Any,
    predictor: Predictor,
    instrument: Instrument | None = None,
    *,
    roi_center_px: tuple[float, float] | None = None,
    min_frames: int = MIN_CALIBRATION_FRAMES,
    max_frames: int = 4000,
    max_thickness_sd: float = 1.5,
    assume_mean_tilt_zero: bool = False,
    max_iterations: int = 8,
    progress: bool = False,
) -> Calibration:
    """Calibrate an instrument from a scan's own frames (see the module's docstring for how).

    Args:
        frames: raw ROIs (N, R, R) in the detector's orientation, binned frames (N, F, F) (no
            per-pixel statistics then), or a :class:`ScanSource`.
        predictor: its networks give each frame's starting point for the likelihood fits.
        instrument: the instrument to start from (default: the source's, else the model's).
        roi_center_px: the ROI's centre on whole detector frames (default: the file's).
        min_frames: frames with a measurable ring needed; fewer is an error.
        max_frames: frames used at most, spread over the scan.
        max_thickness_sd: a thickness standard error above this (Angstrom) is "too little signal".
        progress: a progress bar while the frames are read.
        assume_mean_tilt_zero: estimate the beam-centre offset assuming the scan's mean tilt is
            zero (it is not identifiable otherwise).

    Raises InputError (one line, naming the fix) for too few frames or too little signal.
    """
    from ._sources import ScanSource

    base = (
        instrument or (frames.instrument if isinstance(frames, ScanSource) else None) or predictor.instrument
    )
    raw = read_spread(frames, base.roi_pixels, roi_center_px, max_frames, progress)
    n = len(raw)
    if n < min_frames:
        raise InputError(
            f"a calibration needs at least {min_frames} frames that show the ring, the scan has {n}: "
            "calibrate on a longer scan"
        )
    notes: list[str] = []
    roi = base.roi_pixels
    is_raw = raw.ndim == 3 and raw.shape[1:] == (roi, roi) and roi != base.frame_pixels
    hot: list[tuple[int, int]] = []
    dead: list[tuple[int, int]] = []
    if is_raw:
        hot, dead = find_bad_pixels(raw)
    else:
        notes.append("binned frames: no per-pixel statistics (give raw ROIs to find hot and dead pixels)")
    known = set(base.detector_mask_pixels)
    new = [p for p in hot + dead if p not in known]
    masked_inst = base.replace(detector_mask_pixels=sorted(known | set(new)))

    prepared = predictor.prepare(raw, instrument=masked_inst)
    counts, masked, flags = prepared.counts, prepared.masked, prepared.flags
    usable = np.flatnonzero((flags & FLAG_DTYPE(NO_VALUE)) == 0)
    if len(usable) < min_frames:
        raise InputError(
            f"too little signal: only {len(usable)} of {n} frames have enough counts (a calibration "
            f"needs {min_frames}); calibrate on a scan with a brighter ring or longer exposures"
        )
    counts = np.ascontiguousarray(counts[usable])
    masked = None if masked is None else masked[usable]
    estimate = predictor.predict_arrays(
        np.ascontiguousarray(counts if masked is None else inpaint(counts, masked))
    )
    params = estimate.mean
    thickness = base.film_thickness_angstrom
    if estimate.thickness is not None:  # a model that predicts the film: start from what it says
        thickness = float(np.median(estimate.thickness))
    sd = math.inf
    iterations = 0
    result = None
    ring = np.zeros(len(usable), dtype=bool)
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported)
        check = PhysicsCheck.for_instrument(masked_inst.replace(film_thickness_angstrom=thickness))
        result = check(counts, params, masked, refine=True)
        ring = (
            ((result.flags & FLAG_DTYPE(Flag.NO_RING)) == 0)
            & np.isfinite(result.thickness_score)
            & (result.thickness_information > 0)
        )
        if ring.sum() < min_frames:
            raise InputError(
                f"too little signal: only {int(ring.sum())} of {n} frames show the ring (a calibration "
                f"needs {min_frames}); calibrate on a scan with the reflection in the ROI, longer exposures"
            )
        score = float(result.thickness_score[ring].sum())
        information = float(result.thickness_information[ring].sum())
        sd = 1 / math.sqrt(information)
        step = float(np.clip(score / information, -0.2 * thickness, 0.2 * thickness))
        params = np.where(np.isfinite(result.params), result.params, params)
        thickness += step
        if abs(step) < 0.05 * sd:
            break
    assert result is not None
    if sd > max_thickness_sd:
        raise InputError(
            f"too little signal: the film thickness is known only to +- {sd:.1f} A from {int(ring.sum())} "
            f"frames (needed: {max_thickness_sd:g} A); calibrate on more frames or longer exposures"
        )
    info = result.thickness_information[ring]
    z = result.thickness_score[ring] / np.sqrt(info)
    excess = float(np.mean(z**2) - 1)
    mean_info = float(info.mean())
    spread = math.sqrt(max(excess, 0.0) / mean_info)
    spread_upper = math.sqrt(max(excess + 1.645 * math.sqrt(2 / ring.sum()), 0.0) / mean_info)

    def stats(values: np.ndarray) -> tuple[float, float, float]:
        v = values[np.isfinite(values)]
        return (float(np.median(v)), float(np.percentile(v, 5)), float(np.percentile(v, 95)))

    changes: dict[str, Any] = {"film_thickness_angstrom": round(thickness, 2)}
    offset = offset_sd = None
    if assume_mean_tilt_zero:
        u, v = annulus_centre_px(params[ring, 1], params[ring, 2], base)
        rows0, cols0 = base.beam_centre_offset_px
        offset = (rows0 + float(v.mean()), cols0 + float(u.mean()))
        offset_sd = (float(v.std() / math.sqrt(len(v))), float(u.std() / math.sqrt(len(u))))
        changes["beam_centre_offset_px"] = [round(offset[0], 3), round(offset[1], 3)]
    calibrated = masked_inst.replace(**changes)
    mask = np.zeros((roi, roi), dtype=bool)
    mask[list(calibrated.detector_mask_rows), :] = True
    mask[:, list(calibrated.detector_mask_cols)] = True
    for r, c in calibrated.detector_mask_pixels:
        mask[r, c] = True
    return Calibration(
        instrument=calibrated,
        base=base,
        frames=n,
        measured=int(ring.sum()),
        hot_pixels=hot,
        dead_pixels=dead,
        mask=mask,
        thickness_angstrom=thickness,
        thickness_sd_angstrom=sd,
        thickness_spread_angstrom=spread,
        thickness_spread_upper=spread_upper,
        count_scale=stats(result.scale[ring]),
        background=stats(result.background[ring]),
        beam_centre_offset_px=offset,
        beam_centre_sd_px=offset_sd,
        iterations=iterations,
        notes=notes,
    )
