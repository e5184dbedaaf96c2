"""From intensities to detector counts: count scaling, Poisson noise, ROI cutting and binning."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InputError
from .instrument import Instrument

__all__ = ["bin_roi", "binned_instrument_mask", "orient", "roi_origin", "to_counts"]


def to_counts(
    frames: np.ndarray,
    max_counts: float = 7.0,
    *,
    scale: float | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Scale noise-free intensities to an expected count level and draw Poisson counts.

    Args:
        frames: noise-free intensities (any shape), e.g. from :func:`simulate`.
        max_counts: expected counts of the reference intensity ``scale`` (7 in the seed).
        scale: reference intensity that maps to ``max_counts``, e.g. the library-wide maximum
            stored with a library. None: the maximum of ``frames`` itself.
        rng: a numpy Generator or a seed.

    Returns float32 integer-valued counts of the same shape: Poisson(max_counts * frames / scale).
    """
    frames = np.asarray(frames)
    if not np.all(np.isfinite(frames)) or np.any(frames < 0):
        raise InputError("frames must be finite and non-negative intensities")
    if scale is None:
        scale = float(frames.max())
    if not scale > 0:
        raise InputError(f"scale must be positive (the reference intensity), got {scale!r}")
    if not max_counts > 0:
        raise InputError(f"max_counts must be positive, got {max_counts!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    expected = frames.astype(np.float64) * (max_counts / scale)
    return rng.poisson(expected).astype(np.float32)


def orient(frames: np.ndarray, instrument: Instrument) -> np.ndarray:
    """Map frames from the physical detector's orientation to physics.md's (row, col) frame."""
    if instrument.detector_transpose:
        frames = np.swapaxes(frames, -1, -2)
    if instrument.detector_flip_rows:
        frames = frames[..., ::-1, :]
    if instrument.detector_flip_cols:
        frames = frames[..., :, ::-1]
    return frames


def bin_any(mask: np.ndarray, binning: int) -> np.ndarray:
    """(..., F*b, F*b) bool -> (..., F, F): a binned pixel is masked when any of its raw pixels is."""
    *lead, h, w = mask.shape
    # asarray (a no-op: the result has ndim >= 2): numpy's stubs allow a scalar for any(axis=...)
    return np.asarray(mask.reshape(*lead, h // binning, binning, w // binning, binning).any(axis=(-3, -1)))


@functools.lru_cache(maxsize=8)
def binned_instrument_mask(instrument: Instrument) -> np.ndarray | None:
    """The instrument's raw-ROI mask in physics.md's orientation, binned (any raw pixel masks the
    binned one): bool (F, F), True = not an observation, or None when the instrument masks nothing."""
    if not (
        instrument.detector_mask_rows or instrument.detector_mask_cols or instrument.detector_mask_pixels
    ):
        return None
    roi = instrument.roi_pixels
    raw = np.zeros((roi, roi), dtype=bool)
    raw[list(instrument.detector_mask_rows), :] = True
    raw[:, list(instrument.detector_mask_cols)] = True
    for row, col in instrument.detector_mask_pixels:
        raw[row, col] = True
    mask = bin_any(orient(raw, instrument), instrument.binning)
    mask.flags.writeable = False  # shared by every caller (cached)
    return mask


def roi_origin(center: tuple[float, float], roi: int, detector_shape: tuple[int, int]) -> tuple[int, int]:
    """First (row, col) of a ``roi`` x ``roi`` ROI around ``center``; ValueError if it does not fit.

    The ROI is rows ``round(row) - roi//2 ... round(row) + roi//2 - 1`` (likewise columns), so its
    centre lies between two pixels as in physics.md.
    """
    height, width = detector_shape
    row0 = round(center[0]) - roi // 2
    col0 = round(center[1]) - roi // 2
    if row0 < 0 or col0 < 0 or row0 + roi > height or col0 + roi > width:
        raise InputError(
            f"a {roi} x {roi} ROI around pixel {tuple(center)} does not fit on the {height} x "
            f"{width} detector; move the ROI centre or choose a smaller roi"
        )
    return row0, col0


def bin_roi(
    raw_frames: np.ndarray,
    center: tuple[float, float],
    roi: int = 128,
    binning: int = 2,
    *,
    instrument: Instrument | None = None,
    reduce: str = "sum",
) -> np.ndarray:
    """Cut a square ROI around a detector pixel and bin it, as for measured data.

    Args:
        raw_frames: detector images (..., H, W) in counts.
        center: (row, col) of the central reflected ray on the detector, in raw pixels (see
            :func:`roi_origin`).
        roi: ROI side in raw pixels (128 in the seed).
        binning: binning factor (2: 128 x 128 -> 64 x 64).
        instrument: its detector orientation options (transpose, flips) are applied to the ROI.
        reduce: "sum" (counts add, the default) or "mean".

    Returns float32 frames (..., roi // binning, roi // binning).
    """
    raw = np.asarray(raw_frames)
    if raw.ndim < 2:
        raise InputError(f"raw_frames must be images (..., H, W), got shape {raw.shape}")
    if roi % binning:
        raise InputError(f"roi ({roi}) must be a multiple of binning ({binning})")
    if reduce not in ("sum", "mean"):
        raise InputError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    row0, col0 = roi_origin(center, roi, raw.shape[-2:])
    cut = raw[..., row0 : row0 + roi, col0 : col0 + roi]
    if instrument is not None:
        cut = orient(cut, instrument)
    n = roi // binning
    blocks = cut.reshape(*cut.shape[:-2], n, binning, n, binning).astype(np.float32)
    binned = blocks.sum(axis=(-3, -1)) if reduce == "sum" else blocks.mean(axis=(-3, -1))
    return np.ascontiguousarray(binned)
