"""Moved to :mod:`nanobeam_bluesky.tiled.replay`; re-exported here.

Kept, like ``nanobeam_bluesky.tiled_adapters`` (which server config files written by earlier
versions name, e.g. ``nanobeam_bluesky.tiled_adapters:contained_catalog``), so that configs,
scripts and notebooks written for earlier versions keep working;
new code imports ``nanobeam_bluesky.tiled.replay``.
"""

from .tiled.replay import ReplayResult, RunNotFoundError, find_run, replay_run

__all__ = ["ReplayResult", "RunNotFoundError", "find_run", "replay_run"]
