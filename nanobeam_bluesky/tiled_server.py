"""Moved to :mod:`nanobeam_bluesky.tiled.server`; re-exported here.

Kept, like ``nanobeam_bluesky.tiled_adapters`` (which server config files written by earlier
versions name, e.g. ``nanobeam_bluesky.tiled_adapters:contained_catalog``), so that configs,
scripts and notebooks written for earlier versions keep working;
new code imports ``nanobeam_bluesky.tiled.server``.
"""

from .tiled.server import (
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

__all__ = [
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
]
