"""Derived documents to their subscribers through bluesky's Dispatcher, off the analysis thread.

The analysis thread only queues each derived document. A thread of its own passes it to the
subscribers with bluesky's own ``Dispatcher`` (the RunEngine's), so a slow subscriber (plots, a
TiledWriter while Tiled is slow) delays only itself, never the model. Subscribers that must run
on the main thread (Qt, matplotlib) are queued for it instead: the main thread takes them with
:meth:`SubscriberDelivery.deliver`, which ``NanobeamCallback.flush`` and :class:`DeliverDuringScan`
call.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bluesky.run_engine import Dispatcher
from event_model import DocumentNames

if TYPE_CHECKING:
    from ._analysis import CallbackStats

__all__ = ["DeliverDuringScan", "DocumentCallback", "SubscriberDelivery"]

logger = logging.getLogger(__name__)

#: A subscriber ``func(name, doc)``; doc is a plain dict to bluesky's callbacks, hence Any.
DocumentCallback = Callable[[str, Any], Any]

#: The documents of a derived run.
DERIVED_DOCUMENTS = ("start", "descriptor", "event_page", "stop")


class _LoggingDispatcher(Dispatcher):
    """bluesky's Dispatcher; a failing subscriber is logged with its traceback, the others
    still get the document."""

    def __init__(self) -> None:
        super().__init__()
        self.ignore_exceptions = True

    def process(self, name: DocumentNames, doc: Any) -> None:
        for exc, tb in self.cb_registry.process(name, name.name, doc):
            logger.error(
                "a subscriber failed on a derived %s document", name.name, exc_info=(type(exc), exc, tb)
            )


@dataclass
class _Item:
    name: str
    doc: Mapping[str, Any]
    queued: float


class _Barrier:
    def __init__(self) -> None:
        self.done = threading.Event()


_CLOSE = object()


class SubscriberDelivery:
    """The subscribers of one callback: a worker thread and a main-thread queue, each with its
    own bluesky Dispatcher. Documents keep their order within each."""

    def __init__(
        self,
        stats: CallbackStats,
        extra: Callable[[str, Any], Any] | None = None,
        *,
        warn_after_s: float = 10.0,
    ) -> None:
        #: Called with every document on the worker thread after the subscribers (the
        #: DocumentRouter ``emit=`` callable).
        self.extra = extra
        #: Updated here: ``emit_s`` (s inside subscribers) and ``subscriber_wait_max_s``.
        self.stats = stats
        #: Log a warning (at most once a minute) when a document waited this long (s).
        self.warn_after_s = warn_after_s
        self._last_warning = -math.inf
        self._worker_dispatcher = _LoggingDispatcher()
        self._main_dispatcher = _LoggingDispatcher()
        # Strong references: the registry keeps only weak ones to bound methods.
        self._funcs: dict[int, tuple[DocumentCallback, bool, int]] = {}
        self._tokens = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._main_queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def has_main_thread_subscribers(self) -> bool:
        with self._lock:  # read on the worker thread while subscribe() may change it
            return any(main for _, main, _ in self._funcs.values())

    def subscribe(self, func: DocumentCallback, name: str = "all", *, main_thread: bool = False) -> int:
        dispatcher = self._main_dispatcher if main_thread else self._worker_dispatcher
        private = dispatcher.subscribe(func, name)
        with self._lock:
            self._tokens += 1
            self._funcs[self._tokens] = (func, main_thread, private)
            return self._tokens

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            entry = self._funcs.pop(token, None)
        if entry is not None:
            _, main_thread, private = entry
            (self._main_dispatcher if main_thread else self._worker_dispatcher).unsubscribe(private)

    # ------------------------------------------------------------------ analysis thread
    def put(self, name: str, doc: Mapping[str, Any]) -> None:
        """Queue one derived document (never blocks)."""
        self._ensure_thread()
        self._queue.put(_Item(name, doc, time.monotonic()))

    @property
    def queued(self) -> int:
        return self._queue.qsize() + self._main_queue.qsize()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker thread has passed on everything queued so far."""
        if self._thread is None:
            return True
        barrier = _Barrier()
        self._queue.put(barrier)
        return barrier.done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_CLOSE)
            thread.join(timeout)

    # ------------------------------------------------------------------ main thread
    def deliver(self, timeout: float = 0.0) -> int:
        """Pass the queued documents to the main-thread subscribers; call it from the main thread.

        Waits up to ``timeout`` s for a first document. Returns how many were delivered.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "deliver() passes documents to the main-thread subscribers: call it from the main thread"
            )
        delivered = 0
        block = timeout > 0
        while True:
            try:
                item = self._main_queue.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return delivered
            block = False
            self._dispatch(self._main_dispatcher, item)
            delivered += 1

    # ------------------------------------------------------------------ worker thread
    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._work, name="nanobeam-subscribers", daemon=True
                    )
                    self._thread.start()

    def _dispatch(self, dispatcher: Dispatcher, item: _Item) -> None:
        t0 = time.monotonic()
        waited = t0 - item.queued
        self.stats.subscriber_wait_max_s = max(self.stats.subscriber_wait_max_s, waited)
        if waited >= self.warn_after_s and t0 - self._last_warning >= 60.0:
            self._last_warning = t0
            logger.warning(
                "the derived documents' subscribers are %.1f s behind the analysis (%d documents "
                "queued, %.1f s spent in them so far); the analysis and the scan are not slowed. "
                "Give a TiledWriter a local spool (nanobeam_bluesky.tiled.SpooledTiledWriter), or "
                "plot less often.",
                waited,
                self.queued,
                self.stats.emit_s,
            )
        dispatcher.process(DocumentNames[item.name], item.doc)
        self.stats.emit_s += time.monotonic() - t0

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            if isinstance(item, _Barrier):
                item.done.set()
                continue
            if self.has_main_thread_subscribers:
                self._main_queue.put(item)
            try:
                self._dispatch(self._worker_dispatcher, item)
                if self.extra is not None:
                    self.extra(item.name, item.doc)
            except Exception:  # the delivery thread must outlive any subscriber
                logger.exception("delivering a derived %s document failed", item.name)


class DeliverDuringScan:
    """A bluesky ``during_task`` that delivers main-thread subscribers' documents during ``RE(plan)``.

    ``RunEngine(during_task=DeliverDuringScan(callback))``: while the plan runs, the main thread
    (which would otherwise only wait) passes the derived documents to the subscribers made with
    ``callback.subscribe(func, main_thread=True)``, every ``period_s`` seconds. For Qt, bluesky's own
    plotting callbacks (LivePlot, LiveGrid, BestEffortCallback) move themselves to the Qt main
    thread once ``bluesky.callbacks.mpl_plotting.initialize_qt_teleporter()`` has been called.
    """

    def __init__(self, callback: Any, period_s: float = 0.05) -> None:
        self.callback = callback
        self.period_s = period_s

    def block(self, blocking_event: threading.Event) -> None:
        while not blocking_event.wait(self.period_s):
            self.callback.deliver()
        self.callback.deliver()
