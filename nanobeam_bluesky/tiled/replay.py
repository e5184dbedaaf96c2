"""Replay a past raw run through the live callback and store the derived run.

The run may come from any catalog a beamline has: a Tiled run (bluesky-tiled-plugins' client,
SQL-backed as ``nanobeam serve`` writes them), a databroker v2 ``BlueskyRun`` (also a Tiled
client, e.g. MongoDB-backed) or a databroker v1 ``Header`` (``db[uid]``; its ``.v2`` run is used).
Whatever class the client hands out (``Broker(catalog)`` switches a whole session's runs to the
v2 classes), the run is taken in the layout its catalog stores.

Frames, two ways (``frames=``):

- ``"arrays"`` (the default for Tiled runs): the raw start and descriptor from the run, then
  EventPages whose frames and positions are read from the run's Tiled arrays page by page
  (composed with event-model's ``ComposeEventPage``), then the raw stop. Reads over HTTP only:
  the replaying machine needs no access to the detector files, and a run of any size is
  streamed. A detector file holding fewer frames than registered is fixed once with Tiled's
  validator and the rows it lacks are flagged; every raw frame gets its derived row.
- ``"documents"``: ``run.documents()``, the ecosystem's common ground: step-scan frames come in
  the events; fly-scan (StreamResource/StreamDatum) and legacy (Resource/Datum) frames are read
  from the detector files they name, which must be readable here (the callback's readers).
  Events are regrouped into pages of ``page_size`` (``event_model.pack_event_page``). The export
  of a SQL-backed run is built whole in memory by the server and the client (JSON), so prefer
  ``"arrays"`` for large step scans.

Each page is one model batch (the callback is flushed after every page), so replaying the same
run with the same model gives identical numbers, either way. The derived run links to its parent
through ``parent_uid`` (set by the callback) and carries ``nanobeam_replay`` (when and from which
catalog) in its start document.
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

__all__ = ["FRAME_SOURCES", "ReplayResult", "RunNotFoundError", "as_tiled_run", "find_run", "replay_run"]

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


def _column(stream: _StoredStream, key: str, n: int, dtype: Any, default: np.ndarray) -> np.ndarray:
    """A stream column of ``n`` values; ``default`` where it is absent, short or unreadable."""
    out = default.astype(dtype, copy=True)
    if key not in stream.keys:
        return out
    with contextlib.suppress(Exception):
        values = np.asarray(stream.node(key).read()).reshape(-1)[:n]
        out[: len(values)] = values.astype(dtype)
    return out


def _scalar_number(data_key: Mapping[str, Any]) -> bool:
    return data_key.get("dtype") in ("number", "integer") and list(data_key.get("shape") or []) in ([], [1])


def _is_sql(run: Any) -> bool:
    """A SQL-backed Tiled run (``nanobeam serve``, bluesky-tiled-plugins' catalogs)."""
    item = getattr(run, "item", None)
    if not isinstance(item, Mapping):
        return False
    specs = item.get("attributes", {}).get("specs") or []
    return any(s.get("name") == "BlueskyRun" and str(s.get("version", "")).startswith("3.") for s in specs)


def _is_tiled_run(run: Any) -> bool:
    return isinstance(getattr(run, "item", None), Mapping) and hasattr(run, "context")


def as_tiled_run(run: Any) -> Any:
    """The run in the client class of its catalog's layout.

    A v1 ``Header`` becomes its v2 run; a SQL-backed run becomes bluesky-tiled-plugins' v3 client
    (``Broker(catalog)`` makes the session hand out v2 clients, whose streams hide the arrays);
    a MongoDB-backed run stays the v2 client its layout has. Anything else is returned as given.
    """
    if not _is_tiled_run(run) and _is_tiled_run(getattr(run, "v2", None)):
        run = run.v2  # databroker.v1.Header
    if _is_sql(run) and hasattr(run, "v3"):
        run = run.v3
    return run


class _StoredStream:
    """The arrays of one stream of a Tiled run, in either layout: SQL (``run[stream][key]``) or
    databroker's MongoDB one (``run[stream]["data"][key]``, filled by the server's handlers)."""

    def __init__(self, run: Any, stream_name: str) -> None:
        self.run, self.stream_name = run, stream_name
        self.sql = _is_sql(run)
        self.keys = set(self._container())

    def _container(self) -> Any:
        stream = self.run[self.stream_name]
        return stream if self.sql else stream["data"]

    def node(self, key: str) -> Any:
        return self._container()[key]

    def descriptors(self) -> list[dict[str, Any]]:
        if self.sql:
            found = [d for d in self.run.descriptors if d.get("name", "primary") == self.stream_name]
        else:
            found = list(self.run[self.stream_name].descriptors)
        return [dict(d) for d in found]


class _StoredFrames:
    """The frames of a stored stream, read a page at a time, None for a frame that cannot be read.

    A node that holds fewer frames than registered (a shortened detector file) is fixed once with
    Tiled's validator (bluesky-tiled-plugins; SQL-backed runs); what it changed is noted in
    ``missing``. A node that still fails is given up (``failure`` says why): the rest of its rows
    are None.
    """

    def __init__(
        self,
        stream: _StoredStream,
        image_key: str,
        frame_shape: tuple[int, ...],
        missing: dict[str, list[int]],
    ) -> None:
        self.stream, self.image_key = stream, image_key
        self.frame_shape = frame_shape
        self.missing = missing
        self.node = stream.node(image_key)
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
                if self.validated or not hasattr(self.stream.run, "validate"):
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
            self.stream.run.validate(fix_errors=True, try_reading=False)
            self.node = self.stream.node(self.image_key)
            self.stored = _rows_stored(self.node)
        if fixes:  # what the validator changed goes into the stop's reason
            self.missing.setdefault(
                "Tiled's validator: "
                + "; ".join(str(w.message) for w in fixes if self.image_key in str(w.message)),
                [],
            )


#: Where replay takes the frames from (see the module): "auto" is "arrays" for a Tiled run.
FRAME_SOURCES = ("auto", "arrays", "documents")


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
    frames: str = "auto",
    read_timeout_s: float = 2.0,
) -> ReplayResult:
    """Feed a raw run through NanobeamCallback; return the result.

    Args:
        run: the raw run: a Tiled run (``catalog[uid]``, ``catalog[scan_id]``), a databroker v2
            ``BlueskyRun`` or a v1 ``Header`` (``db[uid]``).
        predictor: the model (``Predictor.from_file(...)`` or ``load_pretrained()``).
        subscribers: callables ``fn(name, doc)`` for the derived documents, e.g. a TiledWriter
            on the derived-run catalog (:func:`nanobeam_bluesky.tiled.catalog.derived_catalog`).
        stream_name, image_key: the raw stream and its frame key (None: found by shape).
        page_size: frames read and predicted at a time.
        source: where the run came from (recorded in the derived start document).
        frames: "arrays" (the run's Tiled arrays), "documents" (``run.documents()``), or "auto"
            (arrays for a Tiled run, else documents); see the module.
        read_timeout_s: with "documents", how long to wait for a detector file's frames (the
            files of a past run are complete: frames still missing then are flagged).
    """
    from ..callbacks import NanobeamCallback

    if frames not in FRAME_SOURCES:
        raise InputError(f"frames must be one of {', '.join(FRAME_SOURCES)}, got {frames!r}")
    if page_size < 1:
        raise InputError(f"page_size must be >= 1, got {page_size}")
    t0 = time.perf_counter()
    run = as_tiled_run(run)
    if frames == "auto":
        frames = "arrays" if _is_tiled_run(run) else "documents"
    if frames == "arrays" and not _is_tiled_run(run):
        raise InputError(f"{type(run).__name__} is not a Tiled run: replay it with frames='documents'")
    if frames == "documents" and not callable(getattr(run, "documents", None)):
        raise InputError(f"{type(run).__name__} has no documents(): give a Tiled run or a databroker run")
    callback = NanobeamCallback(
        predictor,
        image_key=image_key,
        stream_name=stream_name,
        batch_size=page_size,
        allow_instrument_mismatch=allow_instrument_mismatch,
        read_timeout_s=read_timeout_s,
    )
    documents: list[tuple[str, dict[str, Any]]] = []
    replay_note = {"time": time.time(), "source": source, "frames": frames}
    outputs = [lambda name, doc: documents.append((name, doc)), *subscribers]

    def forward(name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            doc = {**doc, "nanobeam_replay": replay_note}
        for func in outputs:
            func(name, doc)

    callback.subscribe(forward)
    try:
        if frames == "arrays":
            raw_uid = _feed_arrays(run, callback, stream_name, image_key, page_size)
        else:
            raw_uid = _feed_documents(run.documents(), callback, stream_name, page_size)
    finally:
        callback.close()
    starts = [doc for name, doc in documents if name == "start"]
    return ReplayResult(
        raw_uid=raw_uid,
        derived_uid=starts[0]["uid"] if starts else None,
        rows=callback.stats.rows_emitted,
        seconds=time.perf_counter() - t0,
        documents=documents,
    )


def _refuse_derived(start: Mapping[str, Any]) -> None:
    from ..callbacks import is_derived_start

    if is_derived_start(start):
        raise InputError(
            f"run {start['uid']} is a derived run; replay its raw parent {start.get('parent_uid')}"
        )


def _interrupted_stop(start: Mapping[str, Any], why: str) -> dict[str, Any]:
    return {
        "uid": str(uuid.uuid4()),
        "time": time.time(),
        "run_start": start["uid"],
        "exit_status": "abort",
        "reason": why,
    }


def _feed_arrays(run: Any, callback: Any, stream_name: str, image_key: str | None, page_size: int) -> str:
    """The raw run to ``callback``, frames and positions read from its Tiled arrays page by page;
    returns the raw uid. Every raw frame gets a row; the stop says which could not be read."""
    from event_model import ComposeEventPage

    from ..callbacks import find_frame_layout, seq_ranges

    start: dict[str, Any] = copy.deepcopy(dict(run.start))
    _refuse_derived(start)
    stored = _StoredStream(run, stream_name)
    descriptors = stored.descriptors()
    if not descriptors:
        raise InputError(f"run {start['uid']} has no stream {stream_name!r}; its streams: {list(run)}")
    descriptor: dict[str, Any] = copy.deepcopy(descriptors[0])
    layout = find_frame_layout(descriptor, callback.frame_shapes, image_key)
    keys = [layout.image_key] + [
        k
        for k, v in descriptor["data_keys"].items()
        if k != layout.image_key and k in stored.keys and _scalar_number(v)
    ]
    # The replayed descriptor describes what the pages carry: the frames and the positions,
    # inline.
    descriptor["data_keys"] = {k: descriptor["data_keys"][k] for k in keys}
    for key in keys:
        descriptor["data_keys"][key].pop("external", None)
    descriptor["uid"] = descriptor.get("uid") or str(uuid.uuid4())
    descriptor["run_start"] = start["uid"]
    compose_page = ComposeEventPage(descriptor, {stream_name: 1})  # type: ignore[arg-type]

    missing: dict[str, list[int]] = {}  # why -> raw seq_nums that could not be read
    raw_stop = copy.deepcopy(dict(run.metadata.get("stop") or {}))
    try:
        callback("start", start)
        callback("descriptor", descriptor)
        reader = _StoredFrames(stored, layout.image_key, layout.frame_shape, missing)
        # Every raw frame gets a derived row: as many as the raw stop says were taken.
        n = int((raw_stop.get("num_events") or {}).get(stream_name, reader.stored))
        seq = _column(stored, "seq_num", n, np.int64, np.arange(1, n + 1))
        default_time = float(descriptor.get("time", start["time"]))
        times = _column(stored, "time", n, np.float64, np.full(n, default_time))
        columns = {k: _column(stored, k, n, np.float64, np.full(n, np.nan)) for k in keys[1:]}
        for i in range(0, n, page_size):
            j = min(i + page_size, n)
            frames = reader.read(i, j)
            lost = [int(seq[i + k]) for k, f in enumerate(frames) if f is None]
            if lost:
                why = reader.failure or f"not in Tiled ({min(reader.stored, n)} of {n} frames stored)"
                missing.setdefault(why, []).extend(lost)
            data: dict[str, Any] = {layout.image_key: frames}
            data.update({k: v[i:j].tolist() for k, v in columns.items()})
            page = compose_page(
                data=data,
                timestamps={k: times[i:j].tolist() for k in data},
                seq_num=seq[i:j].tolist(),
                time=times[i:j].tolist(),
            )
            callback("event_page", page)
            callback.flush()  # one page = one model batch: replays are reproducible
    except Exception as exc:  # the derived run still gets its stop, saying why
        missing.setdefault(f"replay stopped: {type(exc).__name__}: {exc}", [])
        raise
    finally:
        stop = raw_stop or _interrupted_stop(
            start, "the raw run has no stop document (interrupted); replayed the frames stored in Tiled"
        )
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
    return str(start["uid"])


def _feed_documents(
    documents: Iterable[tuple[str, Mapping[str, Any]]], callback: Any, stream_name: str, page_size: int
) -> str:
    """A run's documents to ``callback``, the frame stream's events regrouped into pages of
    ``page_size`` (one model batch each); returns the raw uid. The callback reads the frames
    that the documents reference and flags the rows of those it cannot read."""
    from event_model import pack_event_page, unpack_event_page

    start: dict[str, Any] | None = None
    stop: dict[str, Any] | None = None
    frame_descriptors: set[str] = set()
    pending: list[Any] = []

    def send_pending() -> None:
        while pending:
            page, pending[:] = pending[:page_size], pending[page_size:]
            callback("event_page", pack_event_page(*page))
            callback.flush()  # one page = one model batch: replays are reproducible

    try:
        for name, document in documents:
            doc = dict(document)
            if name == "start":
                _refuse_derived(doc)
                start = doc
                callback(name, doc)
            elif name == "descriptor":
                if doc.get("name", "primary") == stream_name:
                    frame_descriptors.add(doc["uid"])
                callback(name, doc)
            elif name in ("event", "event_page") and doc["descriptor"] in frame_descriptors:
                if pending and pending[0]["descriptor"] != doc["descriptor"]:
                    send_pending()  # a page has one descriptor
                pending.extend([doc] if name == "event" else unpack_event_page(doc))  # type: ignore[arg-type]
                if len(pending) >= page_size:
                    send_pending()
            elif name == "stop":
                stop = doc  # after the last page
            else:  # resources, datums, StreamResources and StreamDatums (the callback joins
                # a StreamDatum's frames with its positions: no flush here, which would not wait)
                callback(name, doc)
    except Exception as exc:
        if start is not None:
            stop = _interrupted_stop(start, f"replay stopped: {type(exc).__name__}: {exc}")
        raise
    finally:
        if start is not None:
            with contextlib.suppress(Exception):
                send_pending()
            callback(
                "stop",
                stop
                or _interrupted_stop(
                    start, "the raw run has no stop document (interrupted); replayed its documents"
                ),
            )
            callback.flush(timeout=60)
    if start is None:
        raise InputError("the run's documents() gave no start document")
    return str(start["uid"])
