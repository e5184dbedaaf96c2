"""The callback out of process: raw documents from a 0MQ proxy in, derived runs republished.

This is how a beamline runs the model on an analysis node (e.g. with a GPU): the RunEngine
publishes to a ``bluesky-0MQ-proxy``; :func:`listen` subscribes to the proxy and publishes the
derived documents back to it under their own prefix, where any consumer (plots, TiledWriter) can
subscribe with ``RemoteDispatcher(..., prefix=b"nanobeam")``. ``nanobeam listen --tiled`` also stores
them in the derived-run catalog (through a local spool: an outage of Tiled never holds the analysis).

Slow joiners: 0MQ drops what is published before a subscriber connects. Runs whose start
document the listener missed are skipped with a warning, never half-analysed, and runs derived by
this package (which come back through the proxy) are never analysed again. Start the listener
before the scans it should analyse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bluesky.callbacks.zmq import Publisher, RemoteDispatcher

from ..errors import InputError
from ..inference import Predictor
from ._callback import NanobeamCallback
from ._live_maps import LiveStrainMaps

__all__ = ["DERIVED_PREFIX", "GuardedCallback", "listen"]

logger = logging.getLogger(__name__)

#: The 0MQ prefix of republished derived documents.
DERIVED_PREFIX = b"nanobeam"


class GuardedCallback:
    """Wraps a callback so that an error in one run is logged instead of stopping the dispatcher."""

    def __init__(self, callback: Callable[[str, dict[str, Any]], Any]) -> None:
        self.callback = callback

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        try:
            self.callback(name, doc)
        except Exception as exc:
            logger.error(
                "nanobeam listen: skipping the frames of %s of run %s: %s",
                name,
                doc.get("run_start", doc.get("uid", "?")),
                exc,
            )


def listen(
    predictor: Predictor,
    from_address: str,
    to_address: str,
    *,
    in_prefix: bytes = b"",
    out_prefix: bytes = DERIVED_PREFIX,
    maps_directory: str | Path | None = None,
    subscribers: Sequence[Callable[[str, dict[str, Any]], Any]] = (),
    on_ready: Callable[[], Any] | None = None,
    **callback_kwargs: Any,
) -> NanobeamCallback:
    """Run the NanobeamCallback behind a RemoteDispatcher until interrupted (SIGINT/SIGTERM).

    Args:
        predictor: the model.
        from_address: the proxy's out-address, where raw documents are published
            (e.g. ``tcp://127.0.0.1:5578``).
        to_address: the proxy's in-address, where derived documents are published back.
        in_prefix: only analyse documents published with this 0MQ prefix (b"": all).
        out_prefix: the prefix of the derived documents.
        maps_directory: also draw live maps and save PNGs there.
        subscribers: more callables ``fn(name, doc)`` for the derived documents, e.g. a
            :class:`~nanobeam_bluesky.tiled.SpooledTiledWriter` on the derived-run catalog.
        on_ready: called once the dispatcher's loop runs (subscriptions made).
        callback_kwargs: passed to :class:`NanobeamCallback` (image_key, stream_name, ...).

    Returns the callback (after the dispatcher stopped), e.g. to read its ``stats``.
    """
    if in_prefix == out_prefix and in_prefix:
        raise InputError("in_prefix and out_prefix must differ, or the listener would read its own output")
    callback = NanobeamCallback(predictor, **callback_kwargs)
    publisher = Publisher(to_address, prefix=out_prefix)
    callback.subscribe(publisher)
    if maps_directory is not None:
        callback.subscribe(LiveStrainMaps(maps_directory))
    for subscriber in subscribers:
        callback.subscribe(subscriber)
    dispatcher = RemoteDispatcher(from_address, prefix=in_prefix)
    dispatcher.subscribe(GuardedCallback(callback))

    def shutdown() -> None:
        for task in asyncio.all_tasks(dispatcher.loop):
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            dispatcher.loop.add_signal_handler(sig, shutdown)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals
            pass
    if on_ready is not None:
        dispatcher.loop.call_soon(on_ready)
    try:
        dispatcher.start()
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        callback.close()
        publisher.close()
    return callback
