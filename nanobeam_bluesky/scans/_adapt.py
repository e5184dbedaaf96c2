"""``nanobeam adapt``: a model fine-tuned to the instrument of a scan, from the scan's own frames."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._schema import FLAG_DTYPE, NO_VALUE
from ..errors import InputError
from ..physics import Instrument
from ..training.adapt import MIN_FRAMES, AdaptationResult, adapt_model, refuse_overwrite
from ._sources import read_spread

if TYPE_CHECKING:
    from ..inference import Predictor

__all__ = ["adapt_to_scan"]


def adapt_to_scan(
    frames: Any,
    predictor: Predictor,
    model_path: str | Path,
    out: str | Path,
    instrument: Instrument | None = None,
    *,
    roi_center_px: tuple[float, float] | None = None,
    max_frames: int = 4000,
    steps: int = 300,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
    scan: str | None = None,
) -> AdaptationResult:
    """Adapt the model in ``model_path`` (loaded as ``predictor``) to a scan's frames.

    Args:
        frames: raw ROIs (N, R, R) in the detector's orientation, binned frames, or a ScanSource.
        instrument: the scan's instrument (default: the source's, else the model's); the adapted
            model is for it. Its mask leaves pixels out of the likelihood.
        max_frames: frames used at most, spread over the scan.
        steps: optimiser steps (each: 128 scan frames and 128 simulated ones).
        scan: what the provenance names as the scan (default: the source's name).

    Raises InputError (one line, naming the fix) for a model of another instrument, too few
    frames with a ring, or an ``out`` that is the input model.
    """
    from ._sources import ScanSource

    refuse_overwrite(model_path, out)  # before the scan is read
    base = (
        instrument or (frames.instrument if isinstance(frames, ScanSource) else None) or predictor.instrument
    )
    raw = read_spread(frames, base.roi_pixels, roi_center_px, max_frames, progress)
    prepared = predictor.prepare(raw, instrument=base)
    usable = (prepared.flags & FLAG_DTYPE(NO_VALUE)) == 0
    if usable.sum() < MIN_FRAMES:
        raise InputError(
            f"{int(usable.sum())} of {len(raw)} frames show a measurable ring; adaptation needs at least "
            f"{MIN_FRAMES}: adapt on a longer scan, or one with more counts"
        )
    masked = None if prepared.masked is None else np.asarray(prepared.masked)[usable]
    name = scan or (frames.name if isinstance(frames, ScanSource) else "frames in memory")
    return adapt_model(
        model_path,
        prepared.counts[usable],
        out,
        base,
        scan=str(name),
        masked=masked,
        steps=steps,
        seed=seed,
        progress=progress,
        command=command,
    )
