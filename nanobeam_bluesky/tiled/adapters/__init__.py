"""Tiled adapters: the simulated library (from its file or simulated on demand), experimental
scan files and directories of them (with the formats beamlines write: areaDetector / NeXus HDF5,
directories of TIFF frames, APS sscan MDA positions), with the MIME types that register them in
a catalog, and the catalog that serves only assets inside its declared storage
(``contained_catalog``).

Server configs name them by these paths, e.g. ``nanobeam_bluesky.tiled.adapters:contained_catalog``
(configs written by earlier versions name ``nanobeam_bluesky.tiled_adapters:...``, which still
works). Their errors become HTTP errors in one place: ``nanobeam_bluesky.tiled._http``.
"""

from .._errors import DataError, RefusedError
from ._guard import contained_catalog, named_instrument
from .beamline import AreaDetectorScanAdapter, MdaScanAdapter, TiffScanAdapter
from .library import LIBRARY_SPEC, MAX_SIMULATED_FRAMES, LazyLibraryAdapter, SimulatedLibraryAdapter
from .mimetypes import (
    ADAPTERS_BY_MIMETYPE,
    INSTRUMENT_MIMETYPE,
    LIBRARY_MIMETYPE,
    SCAN_MIMETYPE,
    detect_mimetype,
)
from .scans import SCAN_SPEC, SCAN_SUFFIXES, ExperimentalScanAdapter, ScanDirectoryAdapter

__all__ = [
    "ADAPTERS_BY_MIMETYPE",
    "INSTRUMENT_MIMETYPE",
    "LIBRARY_MIMETYPE",
    "LIBRARY_SPEC",
    "MAX_SIMULATED_FRAMES",
    "SCAN_MIMETYPE",
    "SCAN_SPEC",
    "SCAN_SUFFIXES",
    "AreaDetectorScanAdapter",
    "DataError",
    "ExperimentalScanAdapter",
    "LazyLibraryAdapter",
    "MdaScanAdapter",
    "RefusedError",
    "ScanDirectoryAdapter",
    "SimulatedLibraryAdapter",
    "TiffScanAdapter",
    "contained_catalog",
    "detect_mimetype",
    "named_instrument",
]
