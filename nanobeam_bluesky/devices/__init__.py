"""A simulated scanning nanodiffraction beamline, for tests, demos and plan development.

- :class:`FrameSimulator` turns a sample (:class:`Sample`, e.g. a phantom) and a stage position
  into Poisson counts on the detector;
- :class:`NanoprobeStage`: ophyd-async SimMotors ``x``/``y`` in µm, and a raster flyer with a
  trigger output;
- :class:`NanoprobeStepDetector`: classic ophyd, frames in events (``bp.grid_scan``);
- :class:`NanoprobeFlyDetector`: ophyd-async StandardDetector, HDF5 (SWMR) + StreamDatum;
- :func:`fly_raster_scan`: kickoff, then ``collect_while_completing``.
"""

from ._fly_detector import (
    NanoprobeAcquireLogic,
    NanoprobeDataLogic,
    NanoprobeDriver,
    NanoprobeFlyDetector,
    NanoprobeTriggerLogic,
)
from ._plans import fly_raster_scan
from ._sample import FrameSimulator, Sample
from ._stage import NanoprobeStage, RasterInfo, RasterPath, TriggerOutput, TriggerPulse
from ._step_detector import NanoprobeStepDetector

__all__ = [
    "FrameSimulator",
    "NanoprobeAcquireLogic",
    "NanoprobeDataLogic",
    "NanoprobeDriver",
    "NanoprobeFlyDetector",
    "NanoprobeStage",
    "NanoprobeStepDetector",
    "NanoprobeTriggerLogic",
    "RasterInfo",
    "RasterPath",
    "Sample",
    "TriggerOutput",
    "TriggerPulse",
    "fly_raster_scan",
]
