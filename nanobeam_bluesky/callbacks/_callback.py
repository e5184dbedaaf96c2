"""``NanobeamCallback``: raw diffraction frames in, a derived (strain, omega, chi) run out, live."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from event_model import DocumentRouter, Filler
from event_model.documents import (
    Datum,
    DatumPage,
    EventDescriptor,
    EventPage,
    Resource,
    RunStart,
    RunStop,
    StreamDatum,
    StreamResource,
)

from ..errors import InputError
from ..inference import Predictor
from ..physics import PARAMETERS, Instrument
from ..quality import FLAG_BITS, FLAG_DTYPE, NO_VALUE, Flag, PooledConsistency
from ._derived import ANALYSIS_STAGE, DerivedRun, is_derived_start
from ._frames import FrameLayout, Storage, find_frame_layout, find_position_keys
from ._readers import AreaDetectorHDF5Handler, StreamReadError, StreamResourceReader
from ._rows import RowBlock, StreamJoin, seq_ranges

__all__ = ["CallbackStats", "NanobeamCallback"]

logger = logging.getLogger(__name__)

#: A subscriber ``func(name, doc)``. The doc is an event-model document: a dict at run time, a
#: TypedDict to event-model and a plain dict to bluesky's callbacks, hence Any.
DocumentCallback = Callable[[str, Any], Any]
#: The kind of event-model document a work item carries.
_D = TypeVar("_D", bound=Mapping[str, Any])


@dataclass
class CallbackStats:
    """Running totals of a NanobeamCallback (updated by its analysis thread)."""

    frames_received: int = 0
    rows_emitted: int = 0
    batches: int = 0
    #: Seconds spent inside the model.
    predict_s: float = 0.0
    #: Seconds spent in the subscribers (writers, plots) of the derived documents.
    emit_s: float = 0.0
    #: Sum and maximum of (row emitted - raw documents received), seconds.
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0
    #: Times the "analysis is behind the scan" warning was logged.
    lag_warnings: int = 0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_sum_s / self.rows_emitted if self.rows_emitted else float("nan")


@dataclass
class _Run:
    """Analysis-thread state of one raw run with a frame stream."""

    derived: DerivedRun
    layout: FrameLayout
    position_keys: list[str]
    join: StreamJoin
    pending: list[RowBlock] = field(default_factory=list)
    stream_resources: dict[str, StreamResource] = field(default_factory=dict)
    readers: dict[str, StreamResourceReader] = field(default_factory=dict)
    filler: Filler | None = None
    #: The data's instrument (None: the model's): orientation, mask, saturation, offset.
    instrument: Instrument | None = None
    #: The physics check pooled over the run (POOLED_MISMATCH, the film the frames say).
    pooled: PooledConsistency = field(default_factory=PooledConsistency)
    #: Rows per flag bit so far, for the stop document.
    flag_counts: dict[str, int] = field(default_factory=dict)
    #: Analysed rows not yet emitted (the first rows wait for the pooled check), and since when.
    held: list[_Rows] = field(default_factory=list)
    held_since: float = 0.0
    errors: list[str] = field(default_factory=list)
    model_error_frames: int = 0
    unreadable_frames: int = 0

    @property
    def pending_frames(self) -> int:
        return sum(len(b) for b in self.pending)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
        if self.filler is not None:
            self.filler.close()


@dataclass
class _Rows:
    """Analysed rows of consecutive blocks, ready to emit."""

    blocks: list[RowBlock]
    mean: np.ndarray
    std: np.ndarray
    err: np.ndarray
    flags: np.ndarray
    fit_quality: np.ndarray


# Work items passed from the calling (RunEngine) thread to the analysis thread.
@dataclass
class _Open:
    start: Mapping[str, Any]
    descriptor: EventDescriptor
    layout: FrameLayout
    position_keys: list[str]
    instrument: Instrument | None


@dataclass
class _Doc(Generic[_D]):
    """A raw document for the analysis thread; handled by ``_on_<name>``."""

    name: str
    doc: _D
    received: float


@dataclass
class _Barrier:
    done: threading.Event


_CLOSE = object()


#: Callbacks with a live analysis thread: closed at interpreter exit, so that the thread is not
#: frozen inside a parallel kernel (GNU OpenMP then aborts the process).
_LIVE: weakref.WeakSet[NanobeamCallback] = weakref.WeakSet()


@atexit.register
def _close_live_callbacks() -> None:
    for callback in list(_LIVE):
        with contextlib.suppress(Exception):
            callback.close(timeout=5.0)


def _numbers(values: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float64 of a data key's values, and the rows whose value is not a number (NaN there)."""
    try:
        return np.asarray(values, dtype=np.float64).reshape(n, -1)[:, 0], np.zeros(n, dtype=bool)
    except (TypeError, ValueError):
        out = np.full(n, np.nan)
        bad = np.ones(n, dtype=bool)
        for i, value in enumerate(list(values)[:n]):
            with contextlib.suppress(TypeError, ValueError, IndexError):
                out[i] = np.asarray(value, dtype=np.float64).reshape(-1)[0]
                bad[i] = False
        return out, bad


def _rows_of_frames(values: Any, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n, *shape) frames and the rows that were not ``shape`` numbers (zeros there)."""
    try:
        return np.stack([np.asarray(f) for f in values]).reshape(n, *shape).astype(
            np.float32, copy=False), np.zeros(n, dtype=bool)
    except (TypeError, ValueError):
        frames = np.zeros((n, *shape), dtype=np.float32)
        bad = np.ones(n, dtype=bool)
        for i, value in enumerate(list(values)[:n]):
            with contextlib.suppress(TypeError, ValueError):
                frames[i] = np.asarray(value, dtype=np.float32).reshape(shape)
                bad[i] = False
        return frames, bad


class NanobeamCallback(DocumentRouter):
    """Turns the diffraction frames of a raw Bluesky run into a derived run of (ε, ω, χ), live.

    Subscribe it to a RunEngine (``RE.subscribe(callback)``) or any document source. Derived
    documents go to the callables registered with :meth:`subscribe`. The model runs on a
    background thread in batches: the raw documents are never blocked, copied or reordered.

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
            many seconds after its raw frame arrived: the model is not keeping pace.
        hold_s: the first rows of a run wait up to this long for enough frames (10) to pool the
            physics check over, so that they carry its verdict (POOLED_MISMATCH) too.
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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.predictor = predictor
        self.image_key = image_key
        self.stream_name = stream_name
        self.position_keys = None if position_keys is None else list(position_keys)
        self.batch_size = batch_size
        self.instrument = instrument
        self.allow_instrument_mismatch = allow_instrument_mismatch
        self.handler_registry = {spec: AreaDetectorHDF5Handler for spec in AreaDetectorHDF5Handler.specs}
        self.handler_registry.update(handler_registry or {})
        self.read_timeout_s = read_timeout_s
        self.analysis_stage = analysis_stage
        self.validate_pages = validate_pages
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
        self._skipped_runs: set[str] = set()
        # Analysis-thread state.
        self._runs: dict[str, _Run] = {}
        self._run_of_descriptor: dict[str, _Run] = {}
        self._fillers: dict[str, Filler] = {}  # raw run uid -> legacy Resource/Datum filler
        self._filler_of_resource: dict[str, Filler] = {}
        self._last_start: str | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._subscribers: dict[int, tuple[DocumentCallback, str]] = {}
        self._tokens = itertools.count()

    # ------------------------------------------------------------------ public API
    def subscribe(self, func: DocumentCallback, name: str = "all") -> int:
        """Send derived documents to ``func(name, doc)``, as ``RunEngine.subscribe`` does.

        Args:
            func: the callback; a strong reference is kept until :meth:`unsubscribe`.
            name: a document name ("start", "event_page", ...) to receive only those, or "all".

        Returns a token for :meth:`unsubscribe`. Callbacks run on the analysis thread.
        """
        if not callable(func):
            raise TypeError(f"subscribe needs a callable func(name, doc), got {func!r}")
        names = {"all", "start", "descriptor", "event_page", "stop"}
        if name not in names:
            raise InputError(f"name must be one of {sorted(names)} (derived runs have no other documents), "
                             f"got {name!r}")
        token = next(self._tokens)
        self._subscribers[token] = (func, name)
        return token

    def unsubscribe(self, token: int) -> None:
        self._subscribers.pop(token, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every frame received so far has its derived row emitted.

        Returns False if ``timeout`` (s) passed first. An analysis thread that died (it should
        not: it catches everything) is restarted, so flush never waits on a dead thread.
        """
        if self._worker is None:
            return True
        done = threading.Event()
        self._queue.put(_Barrier(done))
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while not done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            with self._worker_lock:
                worker = self._worker
                if worker is not None and not worker.is_alive():
                    logger.error("NanobeamCallback: the analysis thread had died; restarting it")
                    self._worker = None
            if worker is not None and not worker.is_alive():
                self._put(None)  # starts a fresh thread; None is skipped by _handle
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish queued work and stop the analysis thread."""
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._queue.put(_CLOSE)
            worker.join(timeout)

    def __enter__(self) -> NanobeamCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def emit(self, name: str, doc: Mapping[str, Any]) -> None:
        """Pass one derived document to every subscriber (a failing subscriber is logged)."""
        t0 = time.perf_counter()
        self._emit(name, doc)
        self.stats.emit_s += time.perf_counter() - t0

    def _emit(self, name: str, doc: Mapping[str, Any]) -> None:
        for func, wanted in list(self._subscribers.values()):
            if wanted != "all" and wanted != name:
                continue
            try:
                func(name, doc)
            except Exception:
                logger.exception("subscriber %r failed on a derived %s document", func, name)

    # ------------------------------------------------------------------ raw documents (caller thread)
    def _put(self, item: Any) -> None:
        if self._worker is None:
            with self._worker_lock:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="nanobeam-analysis",
                                                    daemon=True)
                    self._worker.start()
                    _LIVE.add(self)
        self._queue.put(item)

    def start(self, doc):
        if is_derived_start(doc):
            self._skipped_runs.add(doc["uid"])
        else:
            self._starts[doc["uid"]] = doc
            self._put(_Doc("start", doc, time.monotonic()))

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
        self._put(_Open(start, doc, layout, positions, instrument))

    def event_page(self, doc):
        if doc["descriptor"] in self._descriptors:
            self._put(_Doc("event_page", doc, time.monotonic()))

    def stream_resource(self, doc):
        if doc.get("run_start", next(iter(self._starts), None)) in self._starts:
            self._put(_Doc("stream_resource", doc, time.monotonic()))

    def stream_datum(self, doc):
        if doc["descriptor"] in self._descriptors:
            self._put(_Doc("stream_datum", doc, time.monotonic()))

    def resource(self, doc):
        if self._starts:
            self._put(_Doc("resource", doc, time.monotonic()))

    def datum_page(self, doc):
        if self._starts:
            self._put(_Doc("datum_page", doc, time.monotonic()))

    def datum(self, doc):
        if self._starts:
            self._put(_Doc("datum", doc, time.monotonic()))
        return doc

    def stop(self, doc):
        run_uid = doc["run_start"]
        self._skipped_runs.discard(run_uid)
        if self._starts.pop(run_uid, None) is None:
            return
        for uid in [u for u, r in self._descriptors.items() if r == run_uid]:
            del self._descriptors[uid]
        self._put(_Doc("stop", doc, time.monotonic()))

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
            if self._pending_any():
                item = self._queue.get(block=False)
            else:  # held rows wait at most hold_s for more frames
                held = any(r.held for r in self._runs.values())
                item = self._queue.get(timeout=self.hold_s / 4 if held else None)
        except queue.Empty:  # nothing queued: predict what has accumulated
            self._predict_all()
            return False
        if item is _CLOSE:
            self._predict_all(force=True)
            return True
        try:
            self._handle(item)
        except BaseException:
            logger.exception("NanobeamCallback could not process %r", item)
            if isinstance(item, _Barrier):
                item.done.set()
        if sum(r.pending_frames for r in self._runs.values()) >= self.batch_size:
            self._predict_all()
        return False

    def _pending_any(self) -> bool:
        return any(r.pending for r in self._runs.values())

    def _handle(self, item: Any) -> None:
        if item is None:
            return
        if isinstance(item, _Barrier):
            self._predict_all(force=True)
            item.done.set()
        elif isinstance(item, _Open):
            self._open(item)
        elif isinstance(item, _Doc):
            getattr(self, f"_on_{item.name}")(item)

    def _on_start(self, item: _Doc[RunStart]) -> None:
        self._last_start = item.doc["uid"]
        self._fillers[item.doc["uid"]] = Filler(dict(self.handler_registry), inplace=False)

    def _open(self, item: _Open) -> None:
        uid = item.start["uid"]
        run = self._runs.get(uid)
        if run is None:
            derived = DerivedRun(item.start, item.descriptor, self.predictor, item.layout,
                                 item.position_keys, analysis_stage=self.analysis_stage,
                                 validate_pages=self.validate_pages)
            run = _Run(derived, item.layout, item.position_keys, StreamJoin(item.position_keys),
                       filler=self._fillers.get(uid), instrument=item.instrument)
            self.predictor.physics_check(item.instrument)  # built once per process, before frames
            self._runs[uid] = run
            self.emit("start", derived.start_doc)
            self.emit("descriptor", derived.descriptor_doc)
        elif item.layout != run.layout:
            run.errors.append(f"descriptor {item.descriptor['uid']} changed the frame key/shape; "
                              "its frames were skipped")
            return
        self._run_of_descriptor[item.descriptor["uid"]] = run
        if run.filler is not None:
            run.filler.descriptor(item.descriptor)

    def _on_event_page(self, item: _Doc[EventPage]) -> None:
        run = self._run_of_descriptor.get(item.doc["descriptor"])
        if run is None:
            return
        doc = item.doc
        n = len(doc["seq_num"])
        self.stats.frames_received += n
        key = run.layout.image_key
        frames: np.ndarray | None
        bad = np.zeros(n, dtype=bool)  # rows whose own values are unreadable
        try:
            if run.layout.storage is Storage.DATUM:
                if run.filler is None:
                    raise StreamReadError("no Resource/Datum documents were received for these frames")
                doc = run.filler.fill_event_page(EventPage(**doc), include=[key], inplace=False)
            frames, bad = _rows_of_frames(doc["data"][key], n, run.layout.frame_shape)
            if bad.any():
                rows = np.asarray(doc["seq_num"])[bad].tolist()
                run.errors.append(f"frames of rows {seq_ranges(rows)} missing or not "
                                  f"{run.layout.frame_shape} numbers; those rows are flagged INVALID")
                logger.warning("NanobeamCallback: %s", run.errors[-1])
        except Exception as exc:  # the page's frames cannot be read at all: rows flagged INVALID
            run.unreadable_frames += n
            run.errors.append(f"frames {doc['seq_num'][0]}..{doc['seq_num'][-1]} unreadable: {exc!r}")
            logger.warning("NanobeamCallback: %s", run.errors[-1])
            frames = None
        positions = {}
        for k in run.position_keys:
            if k in doc["data"]:
                values, bad_position = _numbers(doc["data"][k], n)
                positions[k] = values
                if bad_position.any():
                    rows = np.asarray(doc["seq_num"])[bad_position].tolist()
                    run.errors.append(f"position {k!r} of rows {seq_ranges(rows)} is not a number; those "
                                      "rows are flagged INVALID")
                    bad |= bad_position
        run.unreadable_frames += int(bad.sum())
        flags = np.where(bad, FLAG_DTYPE(Flag.INVALID), FLAG_DTYPE(0)).astype(FLAG_DTYPE)
        run.pending.append(RowBlock(np.asarray(doc["seq_num"], dtype=np.int64),
                                    np.asarray(doc["time"], dtype=np.float64), frames, positions,
                                    item.received, flags))

    def _on_stream_resource(self, item: _Doc[StreamResource]) -> None:
        doc = item.doc
        run = self._runs.get(doc.get("run_start", ""))
        if run is None and len(self._runs) == 1:
            run = next(iter(self._runs.values()))
        if run is not None and doc["data_key"] in (run.layout.image_key, *run.position_keys):
            run.stream_resources[doc["uid"]] = doc

    def _on_stream_datum(self, item: _Doc[StreamDatum]) -> None:
        doc = item.doc
        run = self._run_of_descriptor.get(doc["descriptor"])
        if run is None or doc["stream_resource"] not in run.stream_resources:
            return
        resource = run.stream_resources[doc["stream_resource"]]
        start, stop = doc["indices"]["start"], doc["indices"]["stop"]
        seq_start = doc["seq_nums"]["start"]
        n = doc["seq_nums"]["stop"] - seq_start
        if n != stop - start:
            run.errors.append(f"StreamDatum {doc['uid']} has {n} seq_nums for {stop - start} indices")
            n = stop - start
        key = resource["data_key"]
        try:
            reader = run.readers.get(resource["uid"])
            if reader is None:
                reader = run.readers[resource["uid"]] = StreamResourceReader(
                    resource, timeout_s=self.read_timeout_s)
            values: np.ndarray | None = reader.read(start, stop)
        except (StreamReadError, OSError) as exc:
            values = None
            run.errors.append(f"{key} rows {start}..{stop - 1} unreadable: {exc}")
            logger.warning("NanobeamCallback: %s", run.errors[-1])
        if key == run.layout.image_key:
            self.stats.frames_received += n
            if values is None:
                run.unreadable_frames += n
            else:
                values = values.reshape(n, *run.layout.frame_shape)
            run.join.add_frames(seq_start, values, n, time.time(), item.received)
        elif values is not None:
            run.join.add_positions(key, seq_start, values)
        run.pending.extend(run.join.pop_ready())

    def _on_resource(self, item: _Doc[Resource]) -> None:
        filler = self._fillers.get(item.doc.get("run_start") or self._last_start or "")
        if filler is not None:
            filler.resource(item.doc)
            self._filler_of_resource[item.doc["uid"]] = filler

    def _on_datum(self, item: _Doc[Datum]) -> None:
        filler = self._filler_of_resource.get(item.doc["resource"])
        if filler is not None:
            filler.datum(item.doc)

    def _on_datum_page(self, item: _Doc[DatumPage]) -> None:
        filler = self._filler_of_resource.get(item.doc["resource"])
        if filler is not None:
            filler.datum_page(item.doc)

    def _on_stop(self, item: _Doc[RunStop]) -> None:
        doc = item.doc
        filler = self._fillers.pop(doc["run_start"], None)
        for uid in [u for u, f in self._filler_of_resource.items() if f is filler]:
            del self._filler_of_resource[uid]
        run = self._runs.pop(doc["run_start"], None)
        if run is None:
            if filler is not None:
                filler.close()
            return
        run.pending.extend(run.join.pop_ready(force=True))
        self._predict(run, force=True)
        raw_rows = (doc.get("num_events") or {}).get(self.stream_name)
        reasons = [doc.get("reason", "")] if doc.get("reason") else []
        if run.model_error_frames:
            reasons.append(f"NanobeamNN model failed on {run.model_error_frames} of "
                           f"{run.derived.rows} frames (flag MODEL_ERROR)")
        if run.unreadable_frames:
            reasons.append(f"{run.unreadable_frames} frames could not be read (flag INVALID)")
        if raw_rows is not None and raw_rows != run.derived.rows:
            reasons.append(f"raw run reports {raw_rows} frames, {run.derived.rows} were received")
        reasons.extend(run.errors)
        if run.flag_counts:
            reasons.append(f"flagged rows of {run.derived.rows}: " + ", ".join(
                f"{name} {count}" for name, count in run.flag_counts.items()))
        if run.pooled.mismatch:
            inst = run.instrument or self.predictor.instrument
            thickness, sd = run.pooled.thickness_estimate(inst.film_thickness_angstrom)
            reasons.append(
                f"POOLED_MISMATCH: taken together the frames disagree with the instrument's film; they "
                f"say a thickness of {thickness:.1f} +- {sd:.1f} A (instrument "
                f"{inst.film_thickness_angstrom:g} A): check film_thickness_angstrom, energy_kev, "
                "lattice_c_angstrom")
        exit_status = doc.get("exit_status", "success")
        if exit_status == "success" and (run.model_error_frames or run.unreadable_frames):
            exit_status = "fail"
        inst = run.instrument or self.predictor.instrument
        self.emit("stop", run.derived.stop(exit_status, "; ".join(reasons),
                                           run.pooled.summary(inst.film_thickness_angstrom)))
        run.close()
        for uid in [u for u, r in self._run_of_descriptor.items() if r is run]:
            del self._run_of_descriptor[uid]

    def _predict_all(self, force: bool = False) -> None:
        for run in list(self._runs.values()):
            if force:
                run.pending.extend(run.join.pop_ready(force=True))
            self._predict(run, force)

    def _predict(self, run: _Run, force: bool = False) -> None:
        """Run the model on a run's pending rows; emit what is ready as one EventPage.

        The first rows of a run are held until the pooled check has ``min_frames`` frames (or
        ``hold_s`` seconds passed, or the run ends), so that they too carry its verdict.
        """
        if run.pending:
            first = not run.held
            run.held.append(self._analyse(run))
            if first:
                run.held_since = time.monotonic()
        if not run.held:
            return
        pool = run.pooled
        waited = time.monotonic() - run.held_since  # since analysed: our own set-up does not count
        if not force and pool.frames < pool.min_frames and waited < self.hold_s:
            return
        held, run.held = run.held, []
        if pool.mismatch:
            for rows in held:
                measured = (rows.flags & FLAG_DTYPE(NO_VALUE)) == 0
                rows.flags[measured] |= FLAG_DTYPE(Flag.POOLED_MISMATCH)
        blocks = [b for rows in held for b in rows.blocks]
        mean, std, err = (np.concatenate([getattr(r, k) for r in held]) for k in ("mean", "std", "err"))
        flags = np.concatenate([r.flags for r in held])
        fit_quality = np.concatenate([r.fit_quality for r in held])
        for name, bit in FLAG_BITS.items():
            if hits := int(np.count_nonzero(flags & FLAG_DTYPE(bit))):
                run.flag_counts[name] = run.flag_counts.get(name, 0) + hits
        page = run.derived.event_page(blocks, mean, std, flags, err, fit_quality)
        self.emit("event_page", page)
        now = time.monotonic()
        latencies = np.concatenate([np.full(len(b), now - b.received) for b in blocks])
        self.stats.rows_emitted += len(flags)
        self.stats.latency_sum_s += float(latencies.sum())
        self.stats.latency_max_s = max(self.stats.latency_max_s, float(latencies.max()))
        self._warn_if_behind(float(latencies.max()))

    @staticmethod
    def _check_result(result: Any, n: int) -> None:
        if not hasattr(result, "sizes") or result.sizes.get("frame") != n:
            raise InputError(f"the model returned {type(result).__name__} for {n} frames, not a Dataset "
                             "with one row per frame")

    def _analyse(self, run: _Run) -> _Rows:
        """The model and the physics check on a run's pending rows (pooled over the run)."""
        blocks, run.pending = run.pending, []
        n = sum(len(b) for b in blocks)
        rows = _Rows(blocks, np.full((n, 3), np.nan), np.full((n, 3), np.nan), np.full((n, 3), np.nan),
                     np.concatenate([b.flags for b in blocks]).astype(FLAG_DTYPE), np.full(n, np.nan))
        readable = np.concatenate([np.full(len(b), b.frames is not None) for b in blocks])
        if not readable.any():
            return rows
        frames = np.concatenate([b.frames for b in blocks if b.frames is not None])
        t0 = time.perf_counter()
        try:
            result = self.predictor.predict(frames, instrument=run.instrument, check_instrument=False,
                                            pooled=run.pooled)
            self._check_result(result, len(frames))
            rows.mean[readable] = np.stack([result[p].values for p in PARAMETERS], 1)
            rows.std[readable] = np.stack([result[f"{p}_std"].values for p in PARAMETERS], 1)
            rows.err[readable] = np.stack([result[f"{p}_err"].values for p in PARAMETERS], 1)
            rows.fit_quality[readable] = result["fit_quality"].values
            rows.flags[readable] |= result["flag"].values.astype(FLAG_DTYPE)
        except BaseException as exc:  # whatever the model raises, the rows are flagged, the run goes on
            logger.exception("NanobeamNN model failed on %d frames; rows flagged MODEL_ERROR", len(frames))
            rows.flags[readable] |= FLAG_DTYPE(Flag.MODEL_ERROR)
            run.model_error_frames += len(frames)
            message = f"{type(exc).__name__}: {exc}"
            if message not in run.errors:
                run.errors.append(message)
        self.stats.predict_s += time.perf_counter() - t0
        self.stats.batches += 1
        no_value = (rows.flags & FLAG_DTYPE(NO_VALUE)) != 0  # e.g. a row whose position is unreadable
        rows.mean[no_value] = rows.std[no_value] = rows.err[no_value] = np.nan
        rows.fit_quality[no_value] = np.nan
        return rows

    def _warn_if_behind(self, lag_s: float) -> None:
        # Frames are never dropped and the scan never waits, so a model slower than the detector
        # shows up only as a growing lag (and memory): say so, at most once a minute.
        now = time.monotonic()
        if lag_s < self.lag_warning_s or now - self._last_lag_warning < 60.0:
            return
        self._last_lag_warning = now
        self.stats.lag_warnings += 1
        if self.stats.emit_s > self.stats.predict_s:  # the subscribers, not the model, are slow
            logger.warning(
                "analysis is %.1f s behind the scan (%d documents queued): the derived documents' "
                "subscribers took %.1f s, the model %.1f s. No frame is dropped and the scan is not "
                "slowed, but memory grows: give slow subscribers (a TiledWriter while Tiled is slow or "
                "down, plots) their own thread, e.g. nanobeam_bluesky.tiled_spool.SpooledTiledWriter.",
                lag_s, self._queue.qsize(), self.stats.emit_s, self.stats.predict_s)
            return
        logger.warning(
            "analysis is %.1f s behind the scan (%d documents queued): no frame is dropped and the "
            "scan is not slowed, but memory grows. The model took %.1f s: use a GPU (device='cuda', "
            "`nanobeam listen --device cuda` on an analysis node) or a larger batch_size.", lag_s,
            self._queue.qsize(), self.stats.predict_s)
