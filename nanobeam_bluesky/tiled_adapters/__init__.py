"""Moved to :mod:`nanobeam_bluesky.tiled.adapters`; re-exported here.

Kept so that server config files written by earlier versions, which name adapters by this path
(e.g. ``nanobeam_bluesky.tiled_adapters:contained_catalog``), keep working;
new configs name ``nanobeam_bluesky.tiled.adapters:...``.
"""

from ..tiled.adapters import (
    ADAPTERS_BY_MIMETYPE,
    INSTRUMENT_MIMETYPE,
    LIBRARY_MIMETYPE,
    LIBRARY_SPEC,
    MAX_SIMULATED_FRAMES,
    SCAN_MIMETYPE,
    SCAN_SPEC,
    SCAN_SUFFIXES,
    ExperimentalScanAdapter,
    LazyLibraryAdapter,
    RefusedError,
    ScanDirectoryAdapter,
    SimulatedLibraryAdapter,
    contained_catalog,
    detect_mimetype,
    named_instrument,
)

__all__ = [
    "ADAPTERS_BY_MIMETYPE",
    "INSTRUMENT_MIMETYPE",
    "LIBRARY_MIMETYPE",
    "LIBRARY_SPEC",
    "MAX_SIMULATED_FRAMES",
    "SCAN_MIMETYPE",
    "SCAN_SPEC",
    "SCAN_SUFFIXES",
    "ExperimentalScanAdapter",
    "LazyLibraryAdapter",
    "RefusedError",
    "ScanDirectoryAdapter",
    "SimulatedLibraryAdapter",
    "contained_catalog",
    "detect_mimetype",
    "named_instrument",
]
