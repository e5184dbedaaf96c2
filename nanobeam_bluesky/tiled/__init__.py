"""Everything Tiled: the server, its adapters, the run catalog, the durable spool and replay.

- :mod:`.adapters`: Tiled adapters for library files, libraries simulated on demand, experimental
  scan files and directories of them, their MIME types, and ``contained_catalog`` (tiled's catalog
  serving only assets inside its declared storage);
- :mod:`.server`: ``nanobeam serve`` (the tiled config it writes, :class:`TiledServer`);
- :mod:`.catalog`: open the run catalog, write runs into it, the queries people type;
- :mod:`.spool`: :class:`SpooledTiledWriter`, writing runs without blocking or losing them;
- :mod:`.replay`: a past raw run through the live callback, the derived run back to Tiled;
- :mod:`.watch`: ``nanobeam watch``, a derived run followed live through Tiled's stream
  (:class:`DerivedRunWatcher`); ``nanobeam serve`` streams every write (``RedisServer``: a
  local ``redis-server`` for its stream cache).

The adapters' errors (:class:`DataError`, :class:`RefusedError`) become HTTP errors in one
place, ``_http``. The names below are imported on first use (PEP 562): the adapters import torch
and dask (~3 s), which ``from nanobeam_bluesky.tiled.catalog import derived_runs`` need not pay.

Inside this package the tiled library is imported by absolute name (``from tiled.client import
...``); its own modules always import each other relatively.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import DataError, RefusedError
    from ._redis import RedisServer
    from .adapters import (
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
        ScanDirectoryAdapter,
        SimulatedLibraryAdapter,
        contained_catalog,
        detect_mimetype,
        named_instrument,
    )
    from .catalog import (
        ANALYSIS_STAGE_KEY,
        DERIVED_CATALOG,
        MODEL_SHA256_KEY,
        PARENT_UID_KEY,
        SAMPLE_KEY,
        SCAN_TYPE_KEY,
        derived_catalog,
        derived_runs,
        open_catalog,
        runs_analysed_by,
        runs_between,
        runs_by_sample,
        runs_by_scan_type,
        tiled_writer,
        writer_batch_size,
    )
    from .replay import ReplayResult, RunNotFoundError, find_run, replay_run
    from .server import (
        API_KEY_ENV,
        MIN_API_KEY_LENGTH,
        ServerConfig,
        TiledServer,
        check_api_key,
        ensure_catalog,
        free_port,
        resolve_api_key,
        run_server,
        server_config,
        write_server_config,
    )
    from .spool import RunSpool, SpooledTiledWriter
    from .watch import DerivedRunWatcher, LiveRun, StreamLostError, WatchEvent, watch_run

#: The re-exported names by the module that defines them.
_MODULES: dict[str, tuple[str, ...]] = {
    "._errors": ("DataError", "RefusedError"),
    ".adapters": (
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
        "ScanDirectoryAdapter",
        "SimulatedLibraryAdapter",
        "contained_catalog",
        "detect_mimetype",
        "named_instrument",
    ),
    ".catalog": (
        "ANALYSIS_STAGE_KEY",
        "DERIVED_CATALOG",
        "MODEL_SHA256_KEY",
        "PARENT_UID_KEY",
        "SAMPLE_KEY",
        "SCAN_TYPE_KEY",
        "derived_catalog",
        "derived_runs",
        "open_catalog",
        "runs_analysed_by",
        "runs_between",
        "runs_by_sample",
        "runs_by_scan_type",
        "tiled_writer",
        "writer_batch_size",
    ),
    ".replay": ("ReplayResult", "RunNotFoundError", "find_run", "replay_run"),
    ".server": (
        "API_KEY_ENV",
        "MIN_API_KEY_LENGTH",
        "ServerConfig",
        "TiledServer",
        "check_api_key",
        "ensure_catalog",
        "free_port",
        "resolve_api_key",
        "run_server",
        "server_config",
        "write_server_config",
    ),
    ".spool": ("RunSpool", "SpooledTiledWriter"),
    ".watch": ("DerivedRunWatcher", "LiveRun", "StreamLostError", "WatchEvent", "watch_run"),
    "._redis": ("RedisServer",),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "ADAPTERS_BY_MIMETYPE",
    "ANALYSIS_STAGE_KEY",
    "API_KEY_ENV",
    "DERIVED_CATALOG",
    "INSTRUMENT_MIMETYPE",
    "LIBRARY_MIMETYPE",
    "LIBRARY_SPEC",
    "MAX_SIMULATED_FRAMES",
    "MIN_API_KEY_LENGTH",
    "MODEL_SHA256_KEY",
    "PARENT_UID_KEY",
    "SAMPLE_KEY",
    "SCAN_MIMETYPE",
    "SCAN_SPEC",
    "SCAN_SUFFIXES",
    "SCAN_TYPE_KEY",
    "DataError",
    "DerivedRunWatcher",
    "ExperimentalScanAdapter",
    "LazyLibraryAdapter",
    "LiveRun",
    "RedisServer",
    "RefusedError",
    "ReplayResult",
    "RunNotFoundError",
    "RunSpool",
    "ScanDirectoryAdapter",
    "ServerConfig",
    "SimulatedLibraryAdapter",
    "SpooledTiledWriter",
    "StreamLostError",
    "TiledServer",
    "WatchEvent",
    "check_api_key",
    "contained_catalog",
    "derived_catalog",
    "derived_runs",
    "detect_mimetype",
    "ensure_catalog",
    "find_run",
    "free_port",
    "named_instrument",
    "open_catalog",
    "replay_run",
    "resolve_api_key",
    "run_server",
    "runs_analysed_by",
    "runs_between",
    "runs_by_sample",
    "runs_by_scan_type",
    "server_config",
    "tiled_writer",
    "watch_run",
    "write_server_config",
    "writer_batch_size",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
