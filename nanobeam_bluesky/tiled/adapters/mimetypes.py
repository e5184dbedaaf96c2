"""MIME types of our files, the adapters that read them, and a detection hook for ``tiled register``.

Use them in a catalog's config (``adapters_by_mimetype``) or on the command line::

    tiled register http://127.0.0.1:8000/api/v1/metadata/runs /data/scans \\
        --mimetype-hook nanobeam_bluesky.tiled.adapters:detect_mimetype \\
        --adapter "$SCAN=nanobeam_bluesky.tiled.adapters:ExperimentalScanAdapter" \\
        --adapter "$LIB=nanobeam_bluesky.tiled.adapters:SimulatedLibraryAdapter"

with ``SCAN=application/x-nanobeam-scan+hdf5`` and ``LIB=application/x-nanobeam-library+hdf5``.
"""

from __future__ import annotations

from pathlib import Path

import h5py

__all__ = [
    "ADAPTERS_BY_MIMETYPE",
    "INSTRUMENT_MIMETYPE",
    "LIBRARY_MIMETYPE",
    "SCAN_MIMETYPE",
    "detect_mimetype",
]

LIBRARY_MIMETYPE = "application/x-nanobeam-library+hdf5"
SCAN_MIMETYPE = "application/x-nanobeam-scan+hdf5"
#: An instrument config (YAML/JSON), served as a lazily simulated library.
INSTRUMENT_MIMETYPE = "application/x-nanobeam-instrument+yaml"

#: Import paths, as a tiled config's ``adapters_by_mimetype`` wants them.
ADAPTERS_BY_MIMETYPE: dict[str, str] = {
    LIBRARY_MIMETYPE: "nanobeam_bluesky.tiled.adapters:SimulatedLibraryAdapter",
    SCAN_MIMETYPE: "nanobeam_bluesky.tiled.adapters:ExperimentalScanAdapter",
    INSTRUMENT_MIMETYPE: "nanobeam_bluesky.tiled.adapters:LazyLibraryAdapter",
}

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")


def detect_mimetype(path: str | Path, mimetype: str | None) -> str | None:
    """``tiled register`` hook: recognise our HDF5 files by their ``format`` attribute.

    Library files (root attribute ``format = "nanobeam-library"``) and scan files (``/entry``
    attribute ``format = "nanobeam-scan"``) get our MIME types; anything else keeps the MIME type
    tiled guessed. Scan files from other writers can be registered with ``--ext``.
    """
    path = Path(path)
    if path.suffix.lower() not in _HDF5_SUFFIXES or not path.is_file():
        return mimetype
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") == "nanobeam-library":
                return LIBRARY_MIMETYPE
            entry = h5.get("/entry")
            if entry is not None and entry.attrs.get("format") == "nanobeam-scan":
                return SCAN_MIMETYPE
    except OSError:
        return mimetype
    return mimetype
