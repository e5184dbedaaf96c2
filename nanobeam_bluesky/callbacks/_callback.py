"""``NanobeamCallback``: raw diffraction frames in, a derived (strain, omega, chi) run out, live."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from event_model import DocumentRouter, Filler, RunRouter
from event_model.documents import EventPage

from ..errors import InputError
from ..inference import Predictor
from ..physics import Instrument
from ._analysis import AnalysisContext, CallbackStats, RunAnalysis, StreamPlan, run_factory
from ._delivery import DocumentCallback, SubscriberDelivery
from ._derived import ANALYSIS_STAGE, is_derived_start
from ._frames import find_frame_layout, find_frame_time_key, find_position_keys
from ._readers import AreaDetectorHDF5Handler

__all__ = ["NanobeamCallback"]

logger = logging.getLogger(__name__)


@dataclass
class _Doc:
    """A raw document queued for the analysis thread, and when it reached the callback."""

    name: str
    doc: dict[str, Any]
    received: float


@dataclass
class _Barrier:
    done: threading.Event


_CLOSE = object()
#: Queued first at construction: the model's first call (building its kernels and physics check,
#: ~1.3 s here) happens before the first scan's frames, not during them.
_WARM_UP = object()


class _Unfilled(DocumentRouter):
    """The RunRouter's filler slot, left empty: each RunAnalysis fills its own frames (only the
    frame key, so that an unreadable file flags its rows instead of failing the page)."""

    def __init__(self, handler_registry: Any = None, *, root_map: Any = None, inplace: bool = False) -> None:
        super().__init__()

    def event_page(self, doc: EventPage) -> EventPage:
        return doc


#: Callbacks with a live analysis thread: closed at interpreter exit, so that the thread is not
#: frozen inside a parallel kernel (GNU OpenMP then aborts the process).
_LIVE: weakref.WeakSet[NanobeamCallback] = weakref.WeakSet()


@atexit.register
def _close_live_callbacks() -> None:
    for callback in list(_LIVE):
        with contextlib.suppress(Exception):
            callback.close(timeout=5.0)


class NanobeamCallback(DocumentRouter):
    """Turns the diffraction frames of a raw Bluesky run into a derived run of (ε, ω, χ), live.

    Subscribe it to a RunEngine (``RE.subscribe(callback)``) or any document source. Derived
    documents go to the callables registered with :meth:`subscribe` (and to ``emit``). The model
    runs on a background thread in batches: the raw documents are never blocked, copied or
    reordered. The subscribers get the derived documents through bluesky's ``Dispatcher`` on a
    thread of their own, so slow ones (plots, a TiledWriter while Tiled is slow) never slow the
    analysis; ``subscribe(func, main_thread=True)`` hands them to the main thread instead (Qt,
    matplotlib), which takes them in :meth:`deliver`, :meth:`flush`, or during ``RE(plan)`` with
    ``RunEngine(during_task=DeliverDuringScan(callback))``.

    In the shape of bluesky-tiled-plugins' TiledWriter: this router only decides, in the calling
    thread, which documents matter, and queues them; on the analysis thread an event-model
    ``RunRouter`` hands each raw run to its own :class:`RunAnalysis`, which owns the run's filler,
    readers, row join, derived run and stop reasons.

    Error policy:
        - Configuration errors raise at once, in the calling thread, before any frame is
          analysed: bad arguments here; at the raw descriptor, no frame key of the model's shape
          (:class:`ImageKeyError`) or an instrument the model was not trained for
          (:class:`~nanobeam_bluesky.inference.InstrumentMismatchError`). A RunEngine then aborts
          the scan at its start, so a wrong setting costs seconds, not a beamtime of unanalysed
          frames. To have scans go on regardless, subscribe ``GuardedCallback(callback)``, which
          logs the error and skips that run's frames (``nanobeam listen`` does).
        - Data and model errors never raise: unreadable frames or positions flag their rows
          INVALID, a failing model (whatever it raises) flags them MODEL_ERROR, every raw frame
          still gets its derived row, and the derived stop document says what happened.
        - A failing subscriber of the derived documents is logged; the others still get them.

    The derived run follows the Bluesky conventions (see ``DerivedRun``): ``plan_type``,
    ``plan_name``, ``detectors``, ``hints`` with the raw run's dimensions; ``parent_uid`` and
    ``parent_scan_id`` name the scan (its own ``scan_id`` is 0, so ``catalog[N]`` stays the scan);
    ``analysis_stage`` is "nanobeam_nn" (:func:`mark_raw_runs` labels raw runs "raw").

    Args:
        predictor: a :class:`~nanobeam_bluesky.inference.Predictor` (e.g. ``load_pretrained()``).
        image_key: the data key of the frames; None finds the one key of the model's frame shape
            (binned 64 x 64 counts or raw 128 x 128 ROIs, optionally [1, H, W]).
        stream_name: the raw stream that carries the frames.
        position_keys: raw scalar keys copied into each derived row (sample x/y, µm); None takes
            the start document's ``hints.dimensions`` and ``motors``.
        batch_size: most frames per model call; smaller batches form when frames arrive slowly.
        instrument: the data's instrument; None takes the start document's
            ``nanobeam_instrument`` (if any). A model trained for another instrument is an error
            at the descriptor unless ``allow_instrument_mismatch``.
        handler_registry: extra legacy Resource spec handlers (``AD_HDF5`` is built in).
        read_timeout_s: how long to wait for announced frames to appear in an HDF5 file.
        analysis_stage: the ``analysis_stage`` label of the derived start document.
        validate_pages: validate every derived EventPage against event-model's schema (slow:
            about 0.2 ms per row); by default the first page of each run is validated, and the
            start, descriptor and stop documents always are.
        lag_warning_s: log a warning (at most once a minute) when a derived row is emitted this
            many seconds after its raw frame arrived (the model is not keeping pace; the
            subscribers' time does not count), and another when a derived document waited this
            long for the subscribers.
        hold_s: the first rows of a run wait up to this long for enough frames (10) to pool the
            physics check over, so that they carry its verdict (POOLED_MISMATCH) too.
        fit_film: with a model that predicts the film thickness, fit it per frame (False: the
            instrument's film is known; see ``Predictor.predict``).
        frame_time_key: the raw key of each frame's own time (s since the epoch); None finds
            ``<image_key>-time`` (a fly detector's frame timestamps) if the stream has it. The
            derived rows' ``time`` is the frame's time: from that key, else the raw event's time,
            else (a fly scan without frame times) the raw descriptor's.
        emit: event-model's ``DocumentRouter`` hook: a callable ``emit(name, doc)`` given every
            derived document after the subscribers, on their thread (held by a weak reference,
            as event-model does).
        warm_up: start the analysis thread now and make the model's first call on it (its
            kernels and physics check are built then, ~1 s), so that the first scan's rows are
            not held up by it.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        image_key: str | None = None,
        stream_name: str = "primary",
        position_keys: Sequence[str] | None = None,
        batch_size: int = 1024,
        instrument: Instrument | None = None,
        allow_instrument_mismatch: bool = False,
        handler_registry: Mapping[str, Any] | None = None,
        read_timeout_s: float = 10.0,
        analysis_stage: str = ANALYSIS_STAGE,
        validate_pages: bool = False,
        lag_warning_s: float = 10.0,
        hold_s: float = 2.0,
        fit_film: bool = True,
        frame_time_key: str | None = None,
        emit: Callable[[str, Any], Any] | None = None,
        warm_up: bool = True,
    ) -> None:
        super().__init__(emit=emit)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.predictor = predictor
        self.image_key = image_key
        self.stream_name = stream_name
        self.position_keys = None if position_keys is None else list(position_keys)
        self.frame_time_key = frame_time_key
        self.batch_size = batch_size
        self.instrument = instrument
        self.allow_instrument_mismatch = allow_instrument_mismatch
        handlers: dict[str, Any] = {spec: AreaDetectorHDF5Handler for spec in AreaDetectorHDF5Handler.specs}
        handlers.update(handler_registry or {})
        self.lag_warning_s = lag_warning_s
        self.hold_s = hold_s
        self._last_lag_warning = -math.inf
        f = predictor.frame_pixels
        raw = f * predictor.instrument.binning
        self.frame_shapes = ((f, f), (raw, raw))
        self.stats = CallbackStats()
        # Calling-thread state: which documents matter.
        # Mapping, not RunStart: a start document carries the plan's own metadata keys too
        self._starts: dict[str, Mapping[str, Any]] = {}
        self._descriptors: dict[str, str] = {}  # frame-stream descriptor uid -> run uid
        self._resources: dict[str, str | None] = {}  # forwarded Resource uid -> run uid (None: unlabelled)
        self._skipped_runs: set[str] = set()
        self._plans: dict[str, StreamPlan] = {}  # frame-stream descriptor uid -> what to do with it
        # Analysis-thread state: one RunAnalysis per raw run, made by the RunRouter's factory.
        self._delivery = SubscriberDelivery(self.stats, extra=super().emit, warn_after_s=lag_warning_s)
        self._context = AnalysisContext(
            predictor=predictor,
            emit=self._delivery.put,
            report_lag=self._warn_if_behind,
            stats=self.stats,
            plans=self._plans,
            handler_registry=handlers,
            read_timeout_s=read_timeout_s,
            analysis_stage=analysis_stage,
            validate_pages=validate_pages,
            hold_s=hold_s,
            stream_name=stream_name,
            fit_film=fit_film,
        )
        self._runs: dict[str, RunAnalysis] = {}
        # Each RunAnalysis fills its own frames (the frame key only, errors flagged per row).
        self._router = RunRouter(
            [run_factory(self._context, self._runs)], filler_class=cast("type[Filler]", _Unfilled)
        )
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        if warm_up:
            self._ensure_worker()
            self._queue.put(_WARM_UP)

    # ------------------------------------------------------------------ public API
    def subscribe(self, func: DocumentCallback, name: str = "all", *, main_thread: bool = False) -> int:
        """Send derived documents to ``func(name, doc)``, as ``RunEngine.subscribe`` does.

        Args:
            func: the callback; a strong reference is kept until :meth:`unsubscribe`.
            name: a document name ("start", "event_page", ...) to receive only those, or "all".
            main_thread: hand the documents to the main thread (Qt, matplotlib), which takes them
                in :meth:`deliver` (also called by :meth:`flush` from the main thread and by
                ``DeliverDuringScan`` during ``RE(plan)``). Otherwise they run on the
                subscribers' thread, in order, never holding up the analysis.

        Returns a token for :meth:`unsubscribe`.
        """
        if not callable(func):
            raise TypeError(f"subscribe needs a callable func(name, doc), got {func!r}")
        names = {"all", "start", "descriptor", "event_page", "stop"}
        if name not in names:
            raise InputError(
                f"name must be one of {sorted(names)} (derived runs have no other documents), got {name!r}"
            )
        return self._delivery.subscribe(func, name, main_thread=main_thread)

    def unsubscribe(self, token: int) -> None:
        self._delivery.unsubscribe(token)

    def deliver(self, timeout: float = 0.0) -> int:
        """Pass queued derived documents to the ``main_thread=True`` subscribers; call it from the
        main thread. Waits up to ``timeout`` s for a first one; returns how many were passed."""
        return self._delivery.deliver(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every frame received so far has its derived row emitted.

        Returns False if ``timeout`` (s) passed first. The subscribers have had every document
        emitted so far (the main-thread ones too, when flush is called from the main thread). An
        analysis thread that died (it should not: it catches everything) is restarted, so flush
        never waits on a dead thread.
        """
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        if not self._flush_analysis(deadline):
            return False
        remaining = None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())
        if not self._delivery.wait(remaining):
            return False
        if threading.current_thread() is threading.main_thread():
            self._delivery.deliver()
        return True

    def _flush_analysis(self, deadline: float) -> bool:
        if self._worker is None:
            return True
        done = threading.Event()
        self._queue.put(_Barrier(done))
        while not done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            with self._worker_lock:
                worker = self._worker
                if worker is not None and not worker.is_alive():
                    logger.error("NanobeamCallback: the analysis thread had died; restarting it")
                    self._worker = None
            if worker is not None and not worker.is_alive():
                self._restart_worker()
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish queued work, pass it to the subscribers and stop both threads."""
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._queue.put(_CLOSE)
            worker.join(timeout)
        self._delivery.close(timeout)

    def __enter__(self) -> NanobeamCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def emit(self, name: str, doc: Mapping[str, Any]) -> None:
        """Queue one derived document for the subscribers (and ``emit``); never blocks."""
        self._delivery.put(name, doc)

    # ------------------------------------------------------------------ raw documents (caller thread)
    def _restart_worker(self) -> None:
        self._ensure_worker()
        self._queue.put(None)  # wakes the fresh thread; skipped by _handle

    def _ensure_worker(self) -> None:
        if self._worker is None:
            with self._worker_lock:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="nanobeam-analysis", daemon=True)
                    self._worker.start()
                    _LIVE.add(self)

    def _put(self, name: str, doc: dict[str, Any]) -> None:
        self._ensure_worker()
        self._queue.put(_Doc(name, doc, time.monotonic()))

    def start(self, doc):
        if is_derived_start(doc):
            self._skipped_runs.add(doc["uid"])
        else:
            self._starts[doc["uid"]] = doc
            self._put("start", doc)

    def descriptor(self, doc):
        run_uid = doc["run_start"]
        if doc.get("name", "primary") != self.stream_name or run_uid in self._skipped_runs:
            return
        start = self._starts.get(run_uid)
        if start is None:
            self._warn_unknown_run(run_uid)
            return
        layout = find_frame_layout(doc, self.frame_shapes, self.image_key)
        positions = find_position_keys(start, doc, self.position_keys)
        instrument = self.instrument
        if instrument is None and isinstance(start.get("nanobeam_instrument"), Mapping):
            instrument = Instrument.from_dict(dict(start["nanobeam_instrument"]))
        self.predictor.check_instrument(instrument, allow_mismatch=self.allow_instrument_mismatch)
        self._descriptors[doc["uid"]] = run_uid
        time_key = find_frame_time_key(doc, layout.image_key, self.frame_time_key)
        self._plans[doc["uid"]] = StreamPlan(run_uid, layout, positions, instrument, time_key)
        self._put("descriptor", doc)

    def event_page(self, doc):
        if doc["descriptor"] in self._descriptors:
            self._put("event_page", doc)

    def stream_resource(self, doc):
        run_uid = doc.get("run_start") or next(iter(self._starts), None)  # older ophyd-async: no run_start
        if run_uid in self._starts:
            self._put("stream_resource", doc if "run_start" in doc else {**doc, "run_start": run_uid})

    def stream_datum(self, doc):
        if doc["descriptor"] in self._descriptors:
            self._put("stream_datum", doc)

    def resource(self, doc):
        run_uid = doc.get("run_start")
        if run_uid in self._starts or (run_uid is None and self._starts):
            self._resources[doc["uid"]] = run_uid
            self._put("resource", doc)

    def datum_page(self, doc):
        if doc["resource"] in self._resources:
            self._put("datum_page", doc)

    def datum(self, doc):
        if doc["resource"] in self._resources:
            self._put("datum", doc)
        return doc

    def stop(self, doc):
        run_uid = doc["run_start"]
        self._skipped_runs.discard(run_uid)
        if self._starts.pop(run_uid, None) is None:
            return
        for uid in [u for u, r in self._descriptors.items() if r == run_uid]:
            del self._descriptors[uid]
        open_runs = set(self._starts)
        for uid in [u for u, r in self._resources.items() if r == run_uid or (r is None and not open_runs)]:
            del self._resources[uid]
        self._put("stop", doc)

    def _warn_unknown_run(self, run_uid: str) -> None:
        if run_uid not in self._skipped_runs:
            self._skipped_runs.add(run_uid)
            logger.warning(
                "skipping run %s: its start document was not received (the callback joined "
                "mid-run, e.g. a 0MQ subscriber that connected late). Start it before the scan.",
                run_uid,
            )

    # ------------------------------------------------------------------ analysis thread
    def _work(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except BaseException:  # never let the analysis thread die: later runs need it
                logger.exception("NanobeamCallback: unexpected error in the analysis thread; continuing")

    def _step(self) -> bool:
        """Take one item off the queue and handle it; True when the thread should end."""
        try:
            if any(run.pending for run in self._runs.values()):
                item = self._queue.get(block=False)
            else:  # held rows wait at most hold_s for more frames
                held = any(run.held for run in self._runs.values())
                item = self._queue.get(timeout=self.hold_s / 4 if held else None)
        except queue.Empty:  # nothing queued: predict what has accumulated
            self._analyse_all()
            return False
        if item is _CLOSE:
            self._analyse_all(force=True)
            return True
        try:
            self._handle(item)
        except BaseException:
            logger.exception("NanobeamCallback could not process %r", item)
            if isinstance(item, _Barrier):
                item.done.set()
        if sum(run.pending_frames for run in self._runs.values()) >= self.batch_size:
            self._analyse_all()
        return False

    def _handle(self, item: Any) -> None:
        if item is None:
            return
        if item is _WARM_UP:
            self._warm_up()
            return
        if isinstance(item, _Barrier):
            self._analyse_all(force=True)
            item.done.set()
        elif isinstance(item, _Doc):
            self._context.arrival_s = item.received
            try:
                self._router(item.name, item.doc)
            finally:
                if item.name == "stop":
                    run_uid = item.doc["run_start"]
                    self._runs.pop(run_uid, None)
                    for uid in [u for u, plan in list(self._plans.items()) if plan.run_uid == run_uid]:
                        del self._plans[uid]

    def _warm_up(self) -> None:
        f = self.predictor.frame_pixels
        try:  # analyse() builds the physics check for the instrument too
            self.predictor.analyse(
                np.zeros((2, f, f), dtype=np.float32), instrument=self.instrument, check_instrument=False
            )
        except Exception:  # a real frame will meet the same error, flagged there
            logger.debug("NanobeamCallback: warming up the model failed", exc_info=True)

    def _analyse_all(self, force: bool = False) -> None:
        for run in list(self._runs.values()):
            run.analyse(force)

    def _warn_if_behind(self, lag_s: float) -> None:
        # Frames are never dropped and the scan never waits, so a model slower than the detector
        # shows up only as a growing lag (and memory): say so, at most once a minute.
        now = time.monotonic()
        if lag_s < self.lag_warning_s or now - self._last_lag_warning < 60.0:
            return
        self._last_lag_warning = now
        self.stats.lag_warnings += 1
        logger.warning(
            "analysis is %.1f s behind the scan (%d documents queued): no frame is dropped and the "
            "scan is not slowed, but memory grows. The model took %.1f s: use a GPU (device='cuda', "
            "`nanobeam listen --device cuda` on an analysis node) or a larger batch_size.",
            lag_s,
            self._queue.qsize(),
            self.stats.predict_s,
        )
