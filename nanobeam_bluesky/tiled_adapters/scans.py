"""Moved to :mod:`nanobeam_bluesky.tiled.adapters.scans`; re-exported here.

Kept so that server config files written by earlier versions, which name adapters by this path
(e.g. ``nanobeam_bluesky.tiled_adapters.scans:ExperimentalScanAdapter``), keep working;
new configs name ``nanobeam_bluesky.tiled.adapters:...``.
"""

from ..tiled.adapters.scans import SCAN_SPEC, SCAN_SUFFIXES, ExperimentalScanAdapter, ScanDirectoryAdapter

__all__ = ["SCAN_SPEC", "SCAN_SUFFIXES", "ExperimentalScanAdapter", "ScanDirectoryAdapter"]
