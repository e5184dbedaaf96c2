"""Moved to :mod:`nanobeam_bluesky.tiled.spool`; re-exported here.

Kept, like ``nanobeam_bluesky.tiled_adapters`` (which server config files written by earlier
versions name, e.g. ``nanobeam_bluesky.tiled_adapters:contained_catalog``), so that configs,
scripts and notebooks written for earlier versions keep working;
new code imports ``nanobeam_bluesky.tiled.spool``.
"""

from .tiled.spool import RunSpool, SpooledTiledWriter

__all__ = ["RunSpool", "SpooledTiledWriter"]
