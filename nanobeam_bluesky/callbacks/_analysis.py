"""``RunAnalysis``: the analysis of one raw run, made by the callback's RunRouter factory.

One object per raw run with a frame stream owns everything of that run: its filler and readers,
the join of frames with positions, the model calls, the derived run it emits, and the reasons its
stop document gives. The callback's worker thread feeds it the run's documents in order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from event_model import DocumentRouter, Filler
from event_model.documents import (
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
from ..inference import Prediction, Predictor
from ..physics import Instrument
from ..quality import FLAG_BITS, FLAG_DTYPE, NO_VALUE, Flag, PooledConsistency
from ._derived import DerivedRun
from ._frames import FrameLayout, Storage
from ._readers import StreamReadError, StreamResourceReader
from ._rows import RowBlock, StreamJoin, seq_ranges

__all__ = ["AnalysisContext", "CallbackStats", "RunAnalysis", "StreamPlan"]

logger = logging.getLogger(__name__)


@dataclass
class CallbackStats:
    """Running totals of a NanobeamCallback (updated by its analysis thread)."""

    frames_received: int = 0
    rows_emitted: int = 0
    batches: int = 0
    #: Seconds spent inside the model.
    predict_s: float = 0.0
    #: Seconds spent in the subscribers (writers, plots) of the derived documents, on their
    #: own thread: they never hold up the model.
    emit_s: float = 0.0
    #: Longest a derived document waited for the subscribers, s.
    subscriber_wait_max_s: float = 0.0
    #: Sum and maximum of (row emitted - raw documents received), seconds: the analysis alone
    #: (emitting only queues the row for the subscribers).
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0
    #: Times the "analysis is behind the scan" warning was logged.
    lag_warnings: int = 0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_sum_s / self.rows_emitted if self.rows_emitted else float("nan")


@dataclass(frozen=True)
class StreamPlan:
    """What the calling thread decided about a raw frame stream, checked before any frame."""

    run_uid: str
    layout: FrameLayout
    position_keys: list[str]
    #: The data's instrument (None: the model's): orientation, mask, saturation, offset.
    instrument: Instrument | None
    #: The key of each frame's own time (s since the epoch), if the stream has one.
    time_key: str | None = None


@dataclass
class AnalysisContext:
    """What every RunAnalysis of one callback shares: the model, settings, totals and outlet."""

    predictor: Predictor
    emit: Callable[[str, Mapping[str, Any]], None]
    #: Told the largest lag (s, raw document received -> derived row emitted) of each page.
    report_lag: Callable[[float], None]
    stats: CallbackStats
    #: The frame stream of each raw descriptor uid the calling thread accepted.
    plans: Mapping[str, StreamPlan]
    handler_registry: Mapping[str, Any]
    read_timeout_s: float
    analysis_stage: str
    validate_pages: bool
    hold_s: float
    #: The raw run's stream whose ``num_events`` the stop document is checked against.
    stream_name: str
    #: Fit each frame's film (a model that predicts it); False: the instrument's film.
    fit_film: bool = True
    #: time.monotonic() when the document being handled reached the callback (for latency).
    arrival_s: float = 0.0


@dataclass
class _Rows:
    """Analysed rows of consecutive blocks, ready to emit."""

    blocks: list[RowBlock]
    mean: np.ndarray
    std: np.ndarray
    err: np.ndarray
    flags: np.ndarray
    fit_quality: np.ndarray
    #: (n, 3) film thickness, its std and err (Å); NaN for a model that does not predict it.
    film: np.ndarray


def _retry_intervals(timeout_s: float) -> list[float]:
    """The Filler's waits (s) for a frame not yet in its file: doubling from 50 ms, ``timeout_s``
    in all."""
    intervals: list[float] = []
    wait = 0.05
    while sum(intervals) < timeout_s:
        intervals.append(min(wait, timeout_s - sum(intervals)))
        wait *= 2
    return intervals


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
            np.float32, copy=False
        ), np.zeros(n, dtype=bool)
    except (TypeError, ValueError):
        frames = np.zeros((n, *shape), dtype=np.float32)
        bad = np.ones(n, dtype=bool)
        for i, value in enumerate(list(values)[:n]):
            with contextlib.suppress(TypeError, ValueError):
                frames[i] = np.asarray(value, dtype=np.float32).reshape(shape)
                bad[i] = False
        return frames, bad


class RunAnalysis(DocumentRouter):
    """The analysis of one raw run: its documents in, its derived run out.

    Error policy (the same for every run): nothing that goes wrong with the data or the model
    raises here. Unreadable frames or positions flag their rows INVALID, a failing model flags
    its rows MODEL_ERROR; every raw frame still gets its derived row, and the stop document says
    what happened (its ``exit_status`` is "fail" when rows carry no value). Configuration errors
    (no frame key, an instrument the model was not trained for) are the calling thread's: they
    raise at the raw descriptor, before any frame, and never reach this object.
    """

    def __init__(self, start: RunStart, context: AnalysisContext) -> None:
        super().__init__()
        self.start_doc = start
        self.context = context
        # Legacy Resource/Datum frames: filled here, only the frame key, so that an unreadable
        # file flags its rows instead of failing the page.
        # Its handlers are closed with the run (Filler.close drops them unclosed), and it waits
        # for frames not yet written as long as StreamResource reads do (read_timeout_s).
        self.handlers: dict[Any, Any] = {}
        self.filler = Filler(
            dict(context.handler_registry),
            inplace=False,
            handler_cache=self.handlers,
            retry_intervals=_retry_intervals(context.read_timeout_s),
        )
        self.derived: DerivedRun | None = None
        self.plan: StreamPlan | None = None
        self.join: StreamJoin | None = None
        self.pending: list[RowBlock] = []
        self.stream_resources: dict[str, StreamResource] = {}
        self.readers: dict[str, StreamResourceReader] = {}
        #: The physics check pooled over the run (POOLED_MISMATCH, the film the frames say).
        self.pooled = PooledConsistency()
        #: Rows per flag bit so far, for the stop document.
        self.flag_counts: dict[str, int] = {}
        #: Analysed rows not yet emitted (the first rows wait for the pooled check), and since when.
        self.held: list[_Rows] = []
        self.held_since = 0.0
        self.errors: list[str] = []
        self.model_error_frames = 0
        self.unreadable_frames = 0
        self.descriptors: set[str] = set()
        #: The frame stream descriptor's time: the rows' time when nothing better is known.
        self.descriptor_time = float(start.get("time", 0.0))
        self.closed = False

    @property
    def pending_frames(self) -> int:
        return sum(len(b) for b in self.pending)

    @property
    def instrument(self) -> Instrument:
        """The data's instrument (the model's unless the run or the callback gave one)."""
        plan_instrument = None if self.plan is None else self.plan.instrument
        return plan_instrument or self.context.predictor.instrument

    def _error(self, message: str, *, warn: bool = True) -> None:
        self.errors.append(message)
        if warn:
            logger.warning("NanobeamCallback: %s", message)

    # ------------------------------------------------------------------ raw documents
    def descriptor(self, doc: EventDescriptor) -> None:
        plan = self.context.plans.get(doc["uid"])
        if plan is None:  # another stream of the run
            self.filler.descriptor(doc)
            return
        if self.derived is None:
            self.plan = plan
            self.descriptor_time = float(doc.get("time", self.descriptor_time))
            self.join = StreamJoin([*plan.position_keys, *([plan.time_key] if plan.time_key else [])])
            self.derived = DerivedRun(
                self.start_doc,
                doc,
                self.context.predictor,
                plan.layout,
                plan.position_keys,
                analysis_stage=self.context.analysis_stage,
                validate_pages=self.context.validate_pages,
            )
            self.context.predictor.physics_check(plan.instrument)  # built once per process, before frames
            self.context.emit("start", self.derived.start_doc)
            self.context.emit("descriptor", self.derived.descriptor_doc)
        elif self.plan is not None and plan.layout != self.plan.layout:
            self._error(
                f"descriptor {doc['uid']} changed the frame key/shape; its frames were skipped", warn=False
            )
            return
        self.descriptors.add(doc["uid"])
        self.filler.descriptor(doc)

    def event_page(self, doc: EventPage) -> EventPage:
        self._add_rows(doc)
        return doc  # passed on unchanged, as a DocumentRouter does

    def _add_rows(self, doc: EventPage) -> None:
        if doc["descriptor"] not in self.descriptors or self.plan is None:
            return
        layout = self.plan.layout
        n = len(doc["seq_num"])
        self.context.stats.frames_received += n
        frames: np.ndarray | None
        bad = np.zeros(n, dtype=bool)  # rows whose own values are unreadable
        try:
            if layout.storage is Storage.DATUM:
                doc = self.filler.fill_event_page(EventPage(**doc), include=[layout.image_key], inplace=False)
            frames, bad = _rows_of_frames(doc["data"][layout.image_key], n, layout.frame_shape)
            if bad.any():
                rows = np.asarray(doc["seq_num"])[bad].tolist()
                self._error(
                    f"frames of rows {seq_ranges(rows)} missing or not {layout.frame_shape} "
                    "numbers; those rows are flagged INVALID"
                )
        except Exception as exc:  # the page's frames cannot be read at all: rows flagged INVALID
            self.unreadable_frames += n
            self._error(f"frames {doc['seq_num'][0]}..{doc['seq_num'][-1]} unreadable: {exc!r}")
            frames = None
        positions = {}
        for key in self.plan.position_keys:
            if key in doc["data"]:
                values, bad_position = _numbers(doc["data"][key], n)
                positions[key] = values
                if bad_position.any():
                    rows = np.asarray(doc["seq_num"])[bad_position].tolist()
                    self._error(
                        f"position {key!r} of rows {seq_ranges(rows)} is not a number; those "
                        "rows are flagged INVALID",
                        warn=False,
                    )
                    bad |= bad_position
        self.unreadable_frames += int(bad.sum())
        flags = np.where(bad, FLAG_DTYPE(Flag.INVALID), FLAG_DTYPE(0)).astype(FLAG_DTYPE)
        times = np.asarray(doc["time"], dtype=np.float64)
        if self.plan.time_key is not None and self.plan.time_key in doc["data"]:
            frame_times, _ = _numbers(doc["data"][self.plan.time_key], n)
            times = np.where(np.isfinite(frame_times), frame_times, times)
        self.pending.append(
            RowBlock(
                np.asarray(doc["seq_num"], dtype=np.int64),
                times,
                frames,
                positions,
                self.context.arrival_s,
                flags,
            )
        )

    def stream_resource(self, doc: StreamResource) -> None:
        if self.plan is not None and doc["data_key"] in (
            self.plan.layout.image_key,
            *self.plan.position_keys,
            self.plan.time_key,
        ):
            self.stream_resources[doc["uid"]] = doc

    def stream_datum(self, doc: StreamDatum) -> None:
        resource = self.stream_resources.get(doc["stream_resource"])
        if resource is None or doc["descriptor"] not in self.descriptors or self.plan is None:
            return
        assert self.join is not None  # set with the plan
        start, stop = doc["indices"]["start"], doc["indices"]["stop"]
        seq_start = doc["seq_nums"]["start"]
        n = doc["seq_nums"]["stop"] - seq_start
        if n != stop - start:
            self._error(f"StreamDatum {doc['uid']} has {n} seq_nums for {stop - start} indices", warn=False)
            n = stop - start
        key = resource["data_key"]
        try:
            reader = self.readers.get(resource["uid"])
            if reader is None:
                reader = self.readers[resource["uid"]] = StreamResourceReader(
                    resource, timeout_s=self.context.read_timeout_s
                )
            values: np.ndarray | None = reader.read(start, stop)
        except (StreamReadError, OSError) as exc:
            values = None
            self._error(f"{key} rows {start}..{stop - 1} unreadable: {exc}")
        if key == self.plan.layout.image_key:
            self.context.stats.frames_received += n
            if values is None:
                self.unreadable_frames += n
            else:
                values = values.reshape(n, *self.plan.layout.frame_shape)
            self.join.add_frames(seq_start, values, n, self.descriptor_time, self.context.arrival_s)
        elif values is not None:
            self.join.add_positions(key, seq_start, values)
        self.pending.extend(self._timed(self.join.pop_ready()))

    def _timed(self, blocks: list[RowBlock]) -> list[RowBlock]:
        """Joined blocks with their frames' own times, where the stream carries them."""
        key = None if self.plan is None else self.plan.time_key
        for block in blocks:
            frame_times = block.positions.pop(key, None) if key else None
            if frame_times is not None:
                block.times = np.where(np.isfinite(frame_times), frame_times, block.times)
        return blocks

    def resource(self, doc: Resource) -> None:
        self.filler.resource(doc)

    def datum_page(self, doc: DatumPage) -> None:
        self.filler.datum_page(doc)

    def stop(self, doc: RunStop) -> None:
        if self.derived is None:  # the run had no frame stream
            self.close()
            return
        self.analyse(force=True)
        self.context.emit(
            "stop",
            self.derived.stop(
                self._exit_status(doc),
                "; ".join(self._reasons(doc)),
                self.pooled.summary(self.instrument.film_thickness_angstrom),
            ),
        )
        self.close()

    def _reasons(self, doc: RunStop) -> list[str]:
        """What the derived stop document says: the raw reason, then what went wrong here."""
        assert self.derived is not None
        rows = self.derived.rows
        raw_rows = (doc.get("num_events") or {}).get(self.context.stream_name)
        reasons = [doc["reason"]] if doc.get("reason") else []
        if self.model_error_frames:
            reasons.append(
                f"NanobeamNN model failed on {self.model_error_frames} of {rows} frames (flag MODEL_ERROR)"
            )
        if self.unreadable_frames:
            reasons.append(f"{self.unreadable_frames} frames could not be read (flag INVALID)")
        if raw_rows is not None and raw_rows != rows:
            reasons.append(f"raw run reports {raw_rows} frames, {rows} were received")
        reasons.extend(self.errors)
        if self.flag_counts:
            reasons.append(
                f"flagged rows of {rows}: "
                + ", ".join(f"{name} {count}" for name, count in self.flag_counts.items())
            )
        if self.pooled.mismatch:
            film = self.instrument.film_thickness_angstrom
            thickness, sd = self.pooled.thickness_estimate(film)
            reasons.append(
                f"POOLED_MISMATCH: taken together the frames disagree with the instrument's film; they "
                f"say a thickness of {thickness:.1f} +- {sd:.1f} A (instrument {film:g} A): check "
                "film_thickness_angstrom, energy_kev, lattice_c_angstrom"
            )
        return reasons

    def _exit_status(self, doc: RunStop) -> Any:
        exit_status = doc.get("exit_status", "success")
        if exit_status == "success" and (self.model_error_frames or self.unreadable_frames):
            return "fail"
        return exit_status

    def close(self) -> None:
        """Release the run's files (readers, filler handlers)."""
        self.closed = True
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
        for handler in self.handlers.values():
            with contextlib.suppress(Exception):
                handler.close()
        self.handlers.clear()
        self.filler.close()

    # ------------------------------------------------------------------ the model
    def analyse(self, force: bool = False) -> None:
        """Run the model on the pending rows; emit what is ready as one EventPage.

        The first rows of a run are held until the pooled check has ``min_frames`` frames (or
        ``hold_s`` seconds passed, or the run ends), so that they too carry its verdict.
        """
        if self.derived is None:
            return
        if force and self.join is not None:
            self.pending.extend(self._timed(self.join.pop_ready(force=True)))
        if self.pending:
            first = not self.held
            self.held.append(self._predict())
            if first:
                self.held_since = time.monotonic()
        if not self.held:
            return
        pool = self.pooled
        waited = time.monotonic() - self.held_since  # since analysed: our own set-up does not count
        if not force and pool.n_frames < pool.min_frames and waited < self.context.hold_s:
            return
        self._emit_held()

    def _emit_held(self) -> None:
        assert self.derived is not None
        held, self.held = self.held, []
        if self.pooled.mismatch:
            for rows in held:
                measured = (rows.flags & FLAG_DTYPE(NO_VALUE)) == 0
                rows.flags[measured] |= FLAG_DTYPE(Flag.POOLED_MISMATCH)
        blocks = [b for rows in held for b in rows.blocks]
        mean, std, err = (np.concatenate([getattr(r, k) for r in held]) for k in ("mean", "std", "err"))
        flags = np.concatenate([r.flags for r in held])
        fit_quality = np.concatenate([r.fit_quality for r in held])
        film = np.concatenate([r.film for r in held])
        for name, bit in FLAG_BITS.items():
            if hits := int(np.count_nonzero(flags & FLAG_DTYPE(bit))):
                self.flag_counts[name] = self.flag_counts.get(name, 0) + hits
        self.context.emit(
            "event_page", self.derived.event_page(blocks, mean, std, flags, err, fit_quality, film)
        )
        now = time.monotonic()
        latencies = np.concatenate([np.full(len(b), now - b.received) for b in blocks])
        stats = self.context.stats
        stats.rows_emitted += len(flags)
        stats.latency_sum_s += float(latencies.sum())
        stats.latency_max_s = max(stats.latency_max_s, float(latencies.max()))
        self.context.report_lag(float(latencies.max()))

    @staticmethod
    def _check_result(result: Any, n: int) -> None:
        if not isinstance(result, Prediction) or len(result.values) != n:
            raise InputError(
                f"the model returned {type(result).__name__} for {n} frames, not a "
                "Prediction with one row per frame"
            )

    def _predict(self) -> _Rows:
        """The model and the physics check on the pending rows (pooled over the run)."""
        blocks, self.pending = self.pending, []
        n = sum(len(b) for b in blocks)
        rows = _Rows(
            blocks,
            np.full((n, 3), np.nan),
            np.full((n, 3), np.nan),
            np.full((n, 3), np.nan),
            np.concatenate([b.flags for b in blocks]).astype(FLAG_DTYPE),
            np.full(n, np.nan),
            np.full((n, 3), np.nan),
        )
        readable = np.concatenate([np.full(len(b), b.frames is not None) for b in blocks])
        if readable.any():
            self._predict_readable(
                rows, readable, np.concatenate([b.frames for b in blocks if b.frames is not None])
            )
        no_value = (rows.flags & FLAG_DTYPE(NO_VALUE)) != 0  # e.g. a row whose position is unreadable
        rows.mean[no_value] = rows.std[no_value] = rows.err[no_value] = np.nan
        rows.fit_quality[no_value] = np.nan
        rows.film[no_value] = np.nan
        return rows

    def _predict_readable(self, rows: _Rows, readable: np.ndarray, frames: np.ndarray) -> None:
        stats = self.context.stats
        t0 = time.perf_counter()
        try:
            instrument = None if self.plan is None else self.plan.instrument
            result = self.context.predictor.analyse(
                frames,
                instrument=instrument,
                check_instrument=False,
                pooled=self.pooled,
                fit_film=self.context.fit_film,
            )
            self._check_result(result, len(frames))
            rows.mean[readable] = result.values
            rows.std[readable] = result.std
            rows.err[readable] = result.err
            rows.fit_quality[readable] = result.checks.get("fit_quality", np.nan)
            films = (result.thickness, result.thickness_std, result.thickness_err)
            for i, values in enumerate(films):
                if values is not None:
                    rows.film[readable, i] = values
            rows.flags[readable] |= result.flags.astype(FLAG_DTYPE)
        except BaseException as exc:  # whatever the model raises, the rows are flagged, the run goes on
            logger.exception("NanobeamNN model failed on %d frames; rows flagged MODEL_ERROR", len(frames))
            rows.flags[readable] |= FLAG_DTYPE(Flag.MODEL_ERROR)
            self.model_error_frames += len(frames)
            message = f"{type(exc).__name__}: {exc}"
            if message not in self.errors:
                self.errors.append(message)
        stats.predict_s += time.perf_counter() - t0
        stats.batches += 1


def run_factory(
    context: AnalysisContext, runs: dict[str, RunAnalysis]
) -> Callable[[str, RunStart], tuple[Sequence[RunAnalysis], Sequence[Any]]]:
    """The RunRouter factory: one RunAnalysis per raw run, registered in ``runs`` by start uid."""

    def factory(name: str, start: RunStart) -> tuple[list[RunAnalysis], list[Any]]:
        analysis = RunAnalysis(start, context)
        runs[start["uid"]] = analysis
        return [analysis], []

    return factory
