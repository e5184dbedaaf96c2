"""Moved to :mod:`nanobeam_bluesky.tiled.adapters.library`; re-exported here.

Kept so that server config files written by earlier versions, which name adapters by this path
(e.g. ``nanobeam_bluesky.tiled_adapters.library:SimulatedLibraryAdapter.from_path``), keep working;
new configs name ``nanobeam_bluesky.tiled.adapters:...``.
"""

from ..tiled.adapters.library import (
    LIBRARY_SPEC,
    MAX_SIMULATED_FRAMES,
    LazyLibraryAdapter,
    SimulatedLibraryAdapter,
)

__all__ = ["LIBRARY_SPEC", "MAX_SIMULATED_FRAMES", "LazyLibraryAdapter", "SimulatedLibraryAdapter"]
