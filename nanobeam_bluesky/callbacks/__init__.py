"""Live analysis callbacks: raw diffraction frames -> a derived (strain, omega, chi) run.

- :class:`NanobeamCallback`: the analysis, as an event-model DocumentRouter: a thin router
  whose RunRouter makes one :class:`RunAnalysis` per raw run.
- :class:`LiveStrainMaps`: matplotlib maps of the derived rows, saved as PNG at stop.
- :func:`listen`: the callback behind bluesky's 0MQ RemoteDispatcher (``nanobeam listen``).
"""

from ._analysis import CallbackStats, RunAnalysis, StreamPlan
from ._callback import NanobeamCallback
from ._delivery import DeliverDuringScan
from ._derived import ANALYSIS_STAGE, DERIVED_FIELDS, RAW_STAGE, DerivedRun, is_derived_start, mark_raw_runs
from ._frames import (
    FrameLayout,
    ImageKeyError,
    Storage,
    find_frame_layout,
    find_frame_time_key,
    find_position_keys,
)
from ._live_maps import LiveStrainMaps, MapGrid
from ._readers import AreaDetectorHDF5Handler, StreamReadError, StreamResourceReader
from ._rows import seq_ranges
from ._zmq import DERIVED_PREFIX, GuardedCallback, listen

__all__ = [
    "ANALYSIS_STAGE",
    "DERIVED_FIELDS",
    "DERIVED_PREFIX",
    "RAW_STAGE",
    "AreaDetectorHDF5Handler",
    "CallbackStats",
    "DeliverDuringScan",
    "DerivedRun",
    "FrameLayout",
    "GuardedCallback",
    "ImageKeyError",
    "LiveStrainMaps",
    "MapGrid",
    "NanobeamCallback",
    "RunAnalysis",
    "Storage",
    "StreamPlan",
    "StreamReadError",
    "StreamResourceReader",
    "find_frame_layout",
    "find_frame_time_key",
    "find_position_keys",
    "is_derived_start",
    "listen",
    "mark_raw_runs",
    "seq_ranges",
]
