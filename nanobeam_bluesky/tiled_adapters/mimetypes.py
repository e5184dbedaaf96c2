"""Moved to :mod:`nanobeam_bluesky.tiled.adapters.mimetypes`; re-exported here.

Kept so that server config files written by earlier versions, which name adapters by this path
(e.g. ``nanobeam_bluesky.tiled_adapters.mimetypes:detect_mimetype``), keep working;
new configs name ``nanobeam_bluesky.tiled.adapters:...``.
"""

from ..tiled.adapters.mimetypes import (
    ADAPTERS_BY_MIMETYPE,
    INSTRUMENT_MIMETYPE,
    LIBRARY_MIMETYPE,
    SCAN_MIMETYPE,
    detect_mimetype,
)

__all__ = [
    "ADAPTERS_BY_MIMETYPE",
    "INSTRUMENT_MIMETYPE",
    "LIBRARY_MIMETYPE",
    "SCAN_MIMETYPE",
    "detect_mimetype",
]
