"""Replay a past raw run from Tiled through the live callback and store the derived run.

Documents exported from Tiled do not carry frames filled in (fly scans reference detector files
through StreamResource/StreamDatum; step-scan images live in Tiled arrays), so the replay
rebuilds the run for :class:`~nanobeam_bluesky.callbacks.NanobeamCallback`: the raw start and
descriptor, then EventPages whose frames and positions are read from the run's Tiled arrays
page by page, then the raw stop. Each page is one model batch (the callback is flushed after
every page), so replaying the same run with the same model gives identical numbers.

The derived run links to its parent through ``parent_uid`` (set by the callback) and carries
``nanobeam_replay`` (when and from which catalog) in its start document.
"""

from __future__ import annotations

import contextlib
import copy
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, NanobeamError

__all__ = ["ReplayResult", "RunNotFoundError", "find_run", "replay_run"]

DocumentCallback = Callable[[str, dict[str, Any]], Any]


class RunNotFoundError(NanobeamError, LookupError, ValueError):
    """No run with the given uid or scan_id in the catalog."""


@dataclass
class ReplayResult:
    """What a replay produced: the derived documents (as emitted) and their uids."""

    raw_uid: str
    derived_uid: str | None
    rows: int
    seconds: float
    documents: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def data(self) -> dict[str, np.ndarray]:
        """The derived rows, key by key (strain, omega, chi, their _std, flag, raw_seq_num...)."""
        pages = [doc for name, doc in self.documents if name == "event_page"]
        if not pages:
            return {}
        return {k: np.concatenate([np.asarray(p["data"][k]) for p in pages]) for k in pages[0]["data"]}

    @property
    def stop(self) -> dict[str, Any] | None:
        stops = [doc for name, doc in self.documents if name == "stop"]
        return stops[-1] if stops else None


def find_run(catalog: Any, run: str | int) -> Any:
    """A raw run by uid, partial uid (>= 5 characters) or scan_id (an int, or digits).

    A scan_id names the latest raw run with it. Derived runs have scan_id 0 (and live in their
    own catalog on ``nanobeam serve``); those written by earlier versions copied their parent's
    scan_id and are passed over.
    """
    from tiled.queries import Key

    from ..callbacks import is_derived_start

    digits = isinstance(run, str) and run.isdigit()
    if isinstance(run, int) or digits:
        matches = catalog.search(Key("start.scan_id") == int(run))
        raw = [r for r in matches.values() if not is_derived_start(r.metadata.get("start", {}))]
        if raw:
            return raw[-1]
        # A uid prefix can be all digits (2 % of 8-character prefixes): try it as one below.
        if isinstance(run, int) or len(run) < 5:
            raise RunNotFoundError(f"no raw run with scan_id {run} in the catalog")
    try:
        return catalog[run]
    except (KeyError, ValueError) as exc:
        what = (
            f"no raw run with scan_id {run}, nor a run whose uid starts with {run!r},"
            if digits
            else f"no run with uid {run!r}"
        )
        raise RunNotFoundError(f"{what} in the catalog ({exc})") from exc


def _rows_stored(node: Any) -> int:
    """Frames a Tiled array node says it holds (0 if even its structure cannot be read)."""
    try:
        return int(node.shape[0])
    except Exception:
        return 0


def _column(
    stream: Any, key: str, n: int, dtype: Any, default: np.ndarray, available: set[str]
) -> np.ndarray:
    """A stream column of ``n`` values; ``default`` where it is absent, short or unreadable."""
    out = default.astype(dtype, copy=True)
    if key not in available:
        return out
    with contextlib.suppress(Exception):
        values = np.asarray(stream[key].read()).reshape(-1)[:n]
        out[: len(values)] = values.astype(dtype)
    return out


def _scalar_number(data_key: Mapping[str, Any]) -> bool:
    return data_key.get("dtype") in ("number", "integer") and list(data_key.get("shape") or []) in ([], [1])


class _StoredFrames:
    """The frames of a stored stream, read a page at a time, None for a frame that cannot be read.

    A node that holds fewer frames than registered (a shortened detector file) is fixed once with
    Tiled's validator (bluesky-tiled-plugins); what it changed is noted in ``missing``. A node that
    still fails is given up (``failure`` says why): the rest of its rows are None.
    """

    def __init__(
        self,
        run: Any,
        stream_name: str,
        image_key: str,
        frame_shape: tuple[int, ...],
        missing: dict[str, list[int]],
    ) -> None:
        self.run, self.stream_name, self.image_key = run, stream_name, image_key
        self.frame_shape = frame_shape
        self.missing = missing
        self.node = run[stream_name][image_key]
        self.stored = _rows_stored(self.node)
        self.validated = False
        self.failure: str | None = None

    def read(self, i: int, j: int) -> list[Any]:
        """Frames i..j-1 (raw row order)."""
        frames: list[Any] = [None] * (j - i)
        while self.failure is None and min(j, self.stored) > i:
            readable = min(j, self.stored)
            try:
                block = np.asarray(self.node[i:readable]).reshape(readable - i, *self.frame_shape)
                frames[: readable - i] = list(block)
                break
            except Exception as exc:  # a shortened or deleted detector file, a server error
                if self.validated or not hasattr(self.run, "validate"):
                    self.failure = f"{type(exc).__name__}: {exc}"
                    break
                self._validate()
        return frames

    def _validate(self) -> None:
        # The file may hold fewer frames than registered: let Tiled's validator fix the stored
        # shape, then read what is there.
        self.validated = True
        with contextlib.suppress(Exception), warnings.catch_warnings(record=True) as fixes:
            warnings.simplefilter("always")
            self.run.validate(fix_errors=True, try_reading=False)
            self.node = self.run[self.stream_name][self.image_key]
            self.stored = _rows_stored(self.node)
        if fixes:  # what the validator changed goes into the stop's reason
            self.missing.setdefault(
                "Tiled's validator: "
                + "; ".join(str(w.message) for w in fixes if self.image_key in str(w.message)),
                [],
            )


def replay_run(
    run: Any,
    predictor: Any,
    *,
    subscribers: Iterable[DocumentCallback] = (),
    stream_name: str = "primary",
    image_key: str | None = None,
    page_size: int = 512,
    allow_instrument_mismatch: bool = False,
    source: str = "",
) -> ReplayResult:
    """Feed a raw run (a tiled BlueskyRun client) through NanobeamCallback; return the result.

    Args:
        run: the raw run, e.g. ``catalog[uid]``.
        predictor: the model (``Predictor.from_file(...)`` or ``load_pretrained()``).
        subscribers: callables ``fn(name, doc)`` for the derived documents, e.g. a TiledWriter
            (:func:`nanobeam_bluesky.tiled.catalog.tiled_writer`) to store the derived run.
        stream_name, image_key: the raw stream and its frame key (None: found by shape).
        page_size: frames read from Tiled and predicted at a time.
        source: where the run came from (recorded in the derived start document).
    """
    from ..callbacks import NanobeamCallback, find_frame_layout, is_derived_start, seq_ranges

    t0 = time.perf_counter()
    start: dict[str, Any] = copy.deepcopy(dict(run.start))
    if is_derived_start(start):
        raise InputError(
            f"run {start['uid']} is a derived run; replay its raw parent {start.get('parent_uid')}"
        )
    descriptors = [d for d in run.descriptors if d.get("name", "primary") == stream_name]
    if not descriptors:
        raise InputError(f"run {start['uid']} has no stream {stream_name!r}; its streams: {list(run)}")
    descriptor: dict[str, Any] = copy.deepcopy(dict(descriptors[0]))
    callback = NanobeamCallback(
        predictor,
        image_key=image_key,
        stream_name=stream_name,
        batch_size=max(page_size, 1),
        allow_instrument_mismatch=allow_instrument_mismatch,
    )
    layout = find_frame_layout(descriptor, callback.frame_shapes, image_key)
    stream = run[stream_name]
    available = set(stream)
    keys = [layout.image_key] + [
        k
        for k, v in descriptor["data_keys"].items()
        if k != layout.image_key and k in available and _scalar_number(v)
    ]
    # The frames (and positions) will be inline in the pages built below.
    for key in keys:
        descriptor["data_keys"][key].pop("external", None)
    descriptor["uid"] = descriptor.get("uid") or str(uuid.uuid4())
    descriptor["run_start"] = start["uid"]

    documents: list[tuple[str, dict[str, Any]]] = []
    replay_note = {"time": time.time(), "source": source}

    def record(name: str, doc: dict[str, Any]) -> None:
        documents.append((name, doc))

    outputs = [record, *subscribers]

    def forward(name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            doc = {**doc, "nanobeam_replay": replay_note}
        for func in outputs:
            func(name, doc)

    callback.subscribe(forward)
    missing: dict[str, list[int]] = {}  # why -> raw seq_nums that could not be read
    raw_stop = copy.deepcopy(dict(run.metadata.get("stop") or {}))
    try:
        callback("start", start)
        callback("descriptor", descriptor)
        reader = _StoredFrames(run, stream_name, layout.image_key, layout.frame_shape, missing)
        # Every raw frame gets a derived row: as many as the raw stop says were taken.
        n = int((raw_stop.get("num_events") or {}).get(stream_name, reader.stored))
        seq = _column(stream, "seq_num", n, np.int64, np.arange(1, n + 1), available)
        times = _column(
            stream, "time", n, np.float64, np.full(n, float(descriptor.get("time", start["time"]))), available
        )
        columns = {k: _column(stream, k, n, np.float64, np.full(n, np.nan), available) for k in keys[1:]}
        for i in range(0, n, page_size):
            j = min(i + page_size, n)
            frames = reader.read(i, j)
            lost = [int(seq[i + k]) for k, f in enumerate(frames) if f is None]
            if lost:
                why = reader.failure or f"not in Tiled ({min(reader.stored, n)} of {n} frames stored)"
                missing.setdefault(why, []).extend(lost)
            data: dict[str, Any] = {layout.image_key: frames}
            data.update({k: v[i:j].tolist() for k, v in columns.items()})
            page = {
                "descriptor": descriptor["uid"],
                "seq_num": seq[i:j].tolist(),
                "time": times[i:j].tolist(),
                "uid": [str(uuid.uuid4()) for _ in range(j - i)],
                "data": data,
                "timestamps": {k: times[i:j].tolist() for k in data},
                "filled": {},
            }
            callback("event_page", page)
            callback.flush()  # one page = one model batch: replays are reproducible
    except Exception as exc:  # the derived run still gets its stop, saying why
        missing.setdefault(f"replay stopped: {type(exc).__name__}: {exc}", [])
        raise
    finally:
        stop = raw_stop or {
            "uid": str(uuid.uuid4()),
            "time": time.time(),
            "exit_status": "abort",
            "reason": "the raw run has no stop document (interrupted); replayed the frames stored in Tiled",
        }
        stop["run_start"] = start["uid"]
        if missing:  # the raw counts stay as they are; the reason says which rows are missing
            told = "; ".join(
                f"rows {seq_ranges(rows)}: {why}" if rows else why for why, rows in missing.items()
            )
            stop["reason"] = "; ".join(
                r
                for r in (stop.get("reason"), f"replay could not read frames (rows flagged INVALID): {told}")
                if r
            )
        if "num_events" not in stop:
            stop["num_events"] = {stream_name: callback.stats.frames_received}
        with contextlib.suppress(Exception):
            callback("stop", stop)
            callback.flush(timeout=60)
        callback.close()
    starts = [doc for name, doc in documents if name == "start"]
    result = ReplayResult(
        raw_uid=start["uid"],
        derived_uid=starts[0]["uid"] if starts else None,
        rows=callback.stats.rows_emitted,
        seconds=time.perf_counter() - t0,
        documents=documents,
    )
    return result
