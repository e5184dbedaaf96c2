"""Moved to :mod:`nanobeam_bluesky.tiled.catalog`; re-exported here.

Kept, like ``nanobeam_bluesky.tiled_adapters`` (which server config files written by earlier
versions name, e.g. ``nanobeam_bluesky.tiled_adapters:contained_catalog``), so that configs,
scripts and notebooks written for earlier versions keep working;
new code imports ``nanobeam_bluesky.tiled.catalog``.
"""

from .tiled.catalog import (
    MODEL_SHA256_KEY,
    PARENT_UID_KEY,
    SAMPLE_KEY,
    SCAN_TYPE_KEY,
    derived_runs,
    open_catalog,
    runs_analysed_by,
    runs_between,
    runs_by_sample,
    runs_by_scan_type,
    tiled_writer,
    writer_batch_size,
)

__all__ = [
    "MODEL_SHA256_KEY",
    "PARENT_UID_KEY",
    "SAMPLE_KEY",
    "SCAN_TYPE_KEY",
    "derived_runs",
    "open_catalog",
    "runs_analysed_by",
    "runs_between",
    "runs_by_sample",
    "runs_by_scan_type",
    "tiled_writer",
    "writer_batch_size",
]
