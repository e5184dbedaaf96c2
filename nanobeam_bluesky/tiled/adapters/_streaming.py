"""The run catalogs with tiled's streaming cache: every write is also published to subscribers.

tiled 0.2 publishes each write to a catalog node (a table partition appended, an array block
written or patched, a child created, metadata updated) to a *streaming cache*, from which a
websocket (``/api/v1/stream/single/<path>``; ``node.subscribe()`` in ``tiled.client``) replays
and pushes it. Two stores: ``memory`` (in the server process: one process only) and Redis.

Two things this module adds to tiled's Redis store (:class:`NamespacedRedisDatastore`):

- **a namespace per catalog database.** tiled keys the cache by node id, and node ids are
  per database: /runs and /derived (two databases), or two servers sharing a facility Redis,
  would otherwise publish to each other's subscribers (``notify:5`` of a raw table reaching a
  subscriber of derived node 5, which then skips its own sequence numbers).
- **writes never wait on Redis.** tiled publishes before it stores, so a Redis that went away
  would fail every write (the scan's rows would not reach the catalog). Here a publish that
  fails or takes longer than ``publish_timeout`` seconds is logged once and skipped: the row is
  stored; subscribers see their stream close and read what they missed from the catalog.

The datastore is chosen by ``"datastore": "nanobeam-redis"`` in the catalog's ``cache_config``
(``contained_catalog`` passes it to tiled and imports this module, which registers the store
before the catalog starts); its Redis is ``redis_uri`` or ``redis_sentinels`` + ``service_name``
(tiled's own keys ``uri`` / ``sentinels`` would make tiled pick its plain store instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tiled.server.streaming import RedisStreamingDatastore, register_datastore

__all__ = ["DATASTORE_NAME", "NamespacedRedisDatastore"]

DATASTORE_NAME = "nanobeam-redis"
#: Longest a write waits for Redis before it is stored unpublished (seconds).
DEFAULT_PUBLISH_TIMEOUT_S = 2.0
#: Sequence number of a write that was not published (tiled's numbers start at 1).
_UNPUBLISHED = 0

logger = logging.getLogger("nanobeam_bluesky.tiled.streaming")
_T = TypeVar("_T")


@register_datastore(DATASTORE_NAME)
class NamespacedRedisDatastore(RedisStreamingDatastore):
    """tiled's Redis stream store, its keys under ``namespace``, its failures never a write's."""

    def __init__(self, settings: dict[str, Any]) -> None:
        redis_settings = dict(settings)
        redis_settings["uri"] = settings.get("redis_uri")
        redis_settings["sentinels"] = settings.get("redis_sentinels")
        super().__init__(redis_settings)
        self._namespace = str(settings.get("namespace") or "nanobeam")
        self._timeout_s = float(settings.get("publish_timeout", DEFAULT_PUBLISH_TIMEOUT_S))
        self._down_since: float | None = None

    def _key(self, node_id: Any) -> str:
        return f"{self._namespace}:{node_id}"

    async def _guarded(self, call: Callable[[], Awaitable[_T]], fallback: _T) -> _T:
        try:
            result = await asyncio.wait_for(call(), self._timeout_s)
        except Exception as exc:  # redis errors, OSError, timeouts: the write goes on unpublished
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning(
                    "stream cache (Redis) unavailable: %s: %s; writes are stored but not streamed "
                    "until it is back",
                    type(exc).__name__,
                    exc,
                )
            return fallback
        if self._down_since is not None:
            logger.warning(
                "stream cache (Redis) back after %.1f s; streaming again",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        return result

    async def incr_seq(self, node_id: str) -> int:
        base = RedisStreamingDatastore
        return await self._guarded(lambda: base.incr_seq(self, self._key(node_id)), _UNPUBLISHED)

    async def set(self, node_id: Any, sequence: int, metadata: Any, payload: Any = None) -> None:
        if sequence == _UNPUBLISHED:
            return
        base = RedisStreamingDatastore
        await self._guarded(lambda: base.set(self, self._key(node_id), sequence, metadata, payload), None)

    async def close(self, node_id: Any) -> None:
        base = RedisStreamingDatastore
        await self._guarded(lambda: base.close(self, self._key(node_id)), None)

    def make_ws_handler(self, websocket: Any, formatter: Any, uri: str, node_id: Any, schema: Any) -> Any:
        return super().make_ws_handler(websocket, formatter, uri, self._key(node_id), schema)
