"""``nanobeam watch``: follow a derived (ε, ω, χ) run live, from any machine, through Tiled's stream.

What Tiled streams of a derived run (tiled 0.2, written by TiledWriter):

- the run's rows: TiledWriter appends them in batches to one appendable table,
  ``/derived/<uid>/primary/internal`` (``append_partition``); each append reaches the table's
  subscribers (``node.subscribe()`` -> ``new_data``) as a ``table-data`` update whose payload
  is the appended rows (Arrow);
- a new run: ``container-child-created`` on ``/derived``;
- the run's end: the stop document lands in the run's metadata, a
  ``container-child-metadata-updated`` on ``/derived`` (key: the run's uid).

:class:`DerivedRunWatcher` subscribes to both, and reads from the catalog what the stream cannot
give: the rows stored before it subscribed, and those written while it was cut off (a server
restart, Redis gone). Rows are keyed by ``raw_seq_num``, so a row read twice counts once and the
rows it holds at the end are the stored ones. Only ``tiled.client`` over HTTP and websockets: it
needs the server's URI and API key, nothing else.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._schema import RESULT_UNITS
from ..errors import InputError, NanobeamError
from .catalog import PARENT_UID_KEY, derived_catalog

__all__ = ["DerivedRunWatcher", "LiveRun", "Rows", "StreamLostError", "WatchEvent", "as_rows", "watch_run"]

logger = logging.getLogger(__name__)

#: The table TiledWriter appends a stream's scalar rows to (inside ``<run>/<stream>``).
ROWS_TABLE = "internal"
STREAM = "primary"
#: Shortest and longest pause between reconnection attempts (s).
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 5.0

EventKind = Literal["run", "rows", "lost", "resumed", "finished", "waiting", "polling"]


class StreamLostError(NanobeamError, ConnectionError):
    """The server cannot be reached (and did not come back within the time given)."""


@dataclass(frozen=True)
class WatchEvent:
    """What happened: ``kind``, the run it concerns, a line for people, the rows it brought."""

    kind: EventKind
    run: LiveRun | None
    message: str
    new_rows: Rows | None = None
    #: where the new rows came from: Tiled's stream, or a read of the catalog (what it missed)
    via: Literal["stream", "catalog"] = "catalog"


#: Rows as columns: name -> 1-D array, all of one length.
Rows = dict[str, np.ndarray]


def as_rows(table: Any) -> Rows:
    """Columns of a table (a pandas DataFrame as tiled gives it, or a mapping) as numpy arrays."""
    return {str(name): np.asarray(table[name]) for name in table}


def _n(rows: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(rows.values()))) if rows else 0


class LiveRun:
    """The rows of one derived run received so far, each once, ordered by ``raw_seq_num``."""

    def __init__(
        self, uid: str, start: Mapping[str, Any], data_keys: Mapping[str, Any] | None = None
    ) -> None:
        self.uid = uid
        self.start = dict(start)
        self.data_keys = dict(data_keys or {})
        self.finished = False
        self.exit_status: str | None = None
        self._parts: list[Rows] = []
        self._seen: set[int] = set()
        self._table: Rows | None = None
        self._flagged = 0

    @property
    def parent_uid(self) -> str | None:
        return self.start.get(PARENT_UID_KEY)

    @property
    def n_rows(self) -> int:
        return len(self._seen)

    @property
    def n_flagged(self) -> int:
        """Rows that carry a quality flag (their values are not to be trusted)."""
        return self._flagged

    @property
    def expected_rows(self) -> int | None:
        shape = self.start.get("shape")
        n = self.start.get("num_points") or (int(np.prod(shape)) if shape else None)
        return int(n) if n else None

    def units(self, key: str) -> str:
        """The unit of a column (the descriptor's, else the package's: strain "1", angles "deg")."""
        unit = (self.data_keys.get(key) or {}).get("units")
        if unit:
            return str(unit)
        base = key.removesuffix("_std").removesuffix("_err")
        return RESULT_UNITS.get(base, "")

    def merge(self, table: Any) -> Rows:
        """Add the rows not seen before (by ``raw_seq_num``); returns them (columns)."""
        rows = as_rows(table) if table is not None else {}
        if not _n(rows):
            return {}
        seq = rows[_row_key(rows)].astype(np.int64)
        # a batch may hold a row twice (a retried append): its first occurrence only
        _, first = np.unique(seq, return_index=True)
        keep = np.zeros(len(seq), dtype=bool)
        keep[first] = True
        keep &= np.fromiter((int(v) not in self._seen for v in seq), dtype=bool, count=len(seq))
        if not keep.any():
            return {}
        new = {name: values[keep] for name, values in rows.items()}
        self._seen.update(int(v) for v in seq[keep])
        self._parts.append(new)
        self._table = None
        if "flag" in new:
            self._flagged += int(np.count_nonzero(new["flag"]))
        return new

    def table(self) -> Rows:
        """Every row received (columns), sorted by ``raw_seq_num``."""
        if self._table is None:
            if not self._parts:
                return {}
            names = [n for n in self._parts[0] if all(n in part for part in self._parts)]
            table = {n: np.concatenate([part[n] for part in self._parts]) for n in names}
            order = np.argsort(table[_row_key(table)], kind="stable")
            self._table = {n: v[order] for n, v in table.items()}
            self._parts = [self._table]
        return self._table

    def describe(self) -> str:
        """One line: progress, flagged rows, the last values with their units."""
        expected = self.expected_rows
        done = f"{self.n_rows}/{expected}" if expected else f"{self.n_rows}"
        line = f"{self.uid[:8]}: {done} rows, {self.n_flagged} flagged"
        table = self.table()
        if _n(table):
            values = []
            for key in ("strain", "omega", "chi"):
                if key in table:
                    value = float(table[key][-1])
                    unit = self.units(key)
                    text = f"{value:.3e}" if key == "strain" else f"{value:.4f}"
                    values.append(f"{key} {text}" + (f" {unit}" if unit and unit != "1" else ""))
            line += f"; last: {', '.join(values)}"
        return line


def _row_key(rows: Mapping[str, Any]) -> str:
    return "raw_seq_num" if "raw_seq_num" in rows else "seq_num"


def _subscription_classes() -> tuple[type, type]:
    """tiled's table and container subscriptions, each reporting its (re)connections and losses.

    tiled reconnects by itself after an abnormal close (resuming by its sequence numbers, which
    restart with an in-memory store after a server restart); the watcher needs to know, to read
    from the catalog what the stream missed meanwhile.
    """
    import websockets.exceptions
    from tiled.client.stream import ContainerSubscription, TableSubscription

    class _Reporting:
        _report: Any
        _last_connect = 0.0
        _pause = _RETRY_MIN_S

        def _connect(self, start: int | None = None, max_size: int = 1_000_000) -> None:
            # A server that accepts and at once drops the socket (its stream cache is down)
            # must not be hammered: back off while connections stay short-lived.
            if time.monotonic() - self._last_connect < 2 * _RETRY_MAX_S:
                time.sleep(self._pause)
                self._pause = min(2 * self._pause, _RETRY_MAX_S)
            else:
                self._pause = _RETRY_MIN_S
            self._last_connect = time.monotonic()
            super()._connect(start, max_size=max_size)  # type: ignore[misc]
            self._report("connected", None)

        def _receive(self) -> None:
            try:
                super()._receive()  # type: ignore[misc]
            except (websockets.exceptions.ConnectionClosedError, OSError) as exc:
                self._report("lost", exc)
                raise

        def run_reporting(self, start: int | None) -> None:
            try:
                self._run(start, max_size=64 * 2**20)  # type: ignore[attr-defined]
            except Exception as exc:  # refused, gave up retrying: the watcher decides what next
                self._report("failed", exc)
            finally:
                self._report("ended", None)

    class Table(_Reporting, TableSubscription):
        pass

    class Container(_Reporting, ContainerSubscription):
        pass

    return Table, Container


def _describe_loss(detail: Any) -> str:
    rcvd = getattr(detail, "rcvd", None)
    reason = str(getattr(rcvd, "reason", "") or "")
    if rcvd is not None and reason:
        if "subscription lost" in reason.lower():
            return f"the server's stream cache went away ({reason}: is its Redis down?)"
        return f"the server closed the stream ({rcvd.code} {reason})"
    if detail is None:
        return "the server closed the stream (restarting?)"
    return f"{type(detail).__name__}: {detail}" if str(detail) else type(detail).__name__


class DerivedRunWatcher:
    """Follows derived runs live: :meth:`events` yields what happens, as it happens.

    Args:
        uri: the Tiled server (``http://host:8000``), its ``/runs`` or ``/derived`` catalog.
        api_key: the server's API key (else ``$TILED_API_KEY`` / ``$NANOBEAM_TILED_API_KEY``).
        run: a derived run's uid, or a raw run's uid (its newest analysis); None: the newest.
        follow: when the run ends, wait for the next one (``nanobeam watch --latest``).
        poll_s: while the stream is cut off, how often the catalog is read instead (s).
        give_up_s: how long the server may stay unreachable before :class:`StreamLostError`
            (None: keep trying until closed).
    """

    def __init__(
        self,
        uri: str,
        *,
        api_key: str | None = None,
        run: str | None = None,
        follow: bool = False,
        poll_s: float = 2.0,
        give_up_s: float | None = None,
    ) -> None:
        self.uri = uri
        self.follow = follow
        self.poll_s = poll_s
        self.give_up_s = give_up_s
        self.catalog = derived_catalog(uri, api_key=api_key)  # one-line errors: key, reachability
        self.run: LiveRun | None = None
        self._requested = run
        # (source, generation, kind, detail): events of a replaced subscription are dropped
        self._events: queue.Queue[tuple[str, int, str, Any]] = queue.Queue()
        self._generation = {"catalog": 0, "table": 0}
        self._closed = threading.Event()
        self._table_sub: Any = None
        self._catalog_sub: Any = None
        self._table_node: Any = None
        self._stream_ok = {"catalog": False, "table": False}
        self._lost_since: float | None = None
        self._last_poll = 0.0
        self._retry_at = {"catalog": 0.0, "table": 0.0}
        self._table_cls, self._container_cls = _subscription_classes()
        if run is not None:
            self.run = self._open_run(self._resolve(run))

    # ------------------------------------------------------------------ finding runs
    def _resolve(self, run: str) -> str:
        """The derived uid of ``run``: itself, else the newest analysis of the raw run ``run``."""
        from tiled.queries import Key

        if run in self.catalog:
            return run
        analyses = self.catalog.search(Key(f"start.{PARENT_UID_KEY}") == run)
        if len(analyses):
            return str(list(analyses)[-1])
        raise InputError(
            f"no derived run {run!r} on {self.uri}, nor an analysis of a raw run with that uid; "
            "give a uid from /derived (or a raw run's), or leave out --run for the newest"
        )

    def _newest(self) -> str | None:
        keys = self.catalog.keys()
        return str(keys.last()) if len(keys) else None

    def _open_run(self, uid: str) -> LiveRun:
        node = self.catalog[uid]
        metadata = node.metadata
        data_keys: dict[str, Any] = {}
        try:
            data_keys = dict(node[STREAM].metadata.get("data_keys") or {})
        except Exception:  # no rows yet: units from the package's schema until they come
            pass
        live = LiveRun(uid, metadata.get("start") or {}, data_keys)
        stop = metadata.get("stop")
        if stop:
            live.finished, live.exit_status = True, stop.get("exit_status")
        return live

    # ------------------------------------------------------------------ subscriptions
    def _reporter(self, source: str) -> Any:
        """A new generation of ``source``'s subscription, and the function its events go through."""
        self._generation[source] += 1
        generation = self._generation[source]

        def report(kind: str, detail: Any) -> None:
            self._events.put((source, generation, kind, detail))

        return report

    def _subscribe_catalog(self) -> None:
        catalog = self.catalog
        sub = self._container_cls(catalog.context, catalog.path_parts, None, catalog.structure_clients)
        report = sub._report = self._reporter("catalog")
        # tiled holds callbacks weakly: the subscription keeps these two alive
        sub._on_child = lambda update: report("child", update.key)
        sub._on_updated = lambda update: report("updated", (update.key, update.metadata))
        sub.child_created.add_callback(sub._on_child)
        sub.child_metadata_updated.add_callback(sub._on_updated)
        self._catalog_sub = sub
        threading.Thread(target=sub.run_reporting, args=(None,), daemon=True, name="watch-catalog").start()

    def _subscribe_table(self) -> None:
        node = self._table_node
        sub = self._table_cls(node.context, node.path_parts, None)
        report = sub._report = self._reporter("table")
        sub._on_rows = lambda update: report("rows", update.data())
        sub.new_data.add_callback(sub._on_rows)
        self._table_sub = sub
        # start=1: the server replays what its cache holds, then streams; the catalog read on
        # "connected" covers what it no longer holds.
        threading.Thread(target=sub.run_reporting, args=(1,), daemon=True, name="watch-rows").start()

    def _drop_table(self) -> None:
        sub, self._table_sub, self._table_node = self._table_sub, None, None
        self._generation["table"] += 1  # what it still reports is dropped
        self._stream_ok["table"] = False
        if sub is not None:
            threading.Thread(target=sub.disconnect, kwargs={"wait": False}, daemon=True).start()

    # ------------------------------------------------------------------ reading the catalog
    def _find_table(self) -> bool:
        """Open the run's row table once it exists (False: not yet)."""
        assert self.run is not None
        try:
            stream = self.catalog[self.run.uid][STREAM]
            self._table_node = stream.base[ROWS_TABLE]
            if not self.run.data_keys:
                self.run.data_keys = dict(stream.metadata.get("data_keys") or {})
        except KeyError:
            return False
        return True

    def _catch_up(self) -> Rows:
        """Read the stored rows and keep those not yet received (by raw_seq_num)."""
        assert self.run is not None
        if self._table_node is None and not self._find_table():
            return {}
        try:
            stored = self._table_node.read()
        except Exception as exc:
            if self._is_empty_table(exc):
                return {}  # the table is declared but holds no rows yet: look again later
            raise
        return self.run.merge(stored)

    @staticmethod
    def _is_empty_table(exc: BaseException) -> bool:
        """Tiled's answer to reading a table created but not yet appended to (seen while a
        restarted server's writers re-create a run from their spools)."""
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status == 400 and "Partition out of range" in str(exc)

    def _check_stop(self) -> bool:
        assert self.run is not None
        stop = self.catalog[self.run.uid].metadata.get("stop")
        if stop and not self.run.finished:
            self.run.finished, self.run.exit_status = True, stop.get("exit_status")
            return True
        return False

    # ------------------------------------------------------------------ the loop
    def events(self) -> Iterator[WatchEvent]:
        """Yields events until the run ends (with ``follow``: until :meth:`close`)."""
        self._subscribe_catalog()
        if self.run is None:
            newest = self._newest()
            if newest is not None:
                self.run = self._open_run(newest)
        if self.run is None:
            yield WatchEvent("waiting", None, f"no derived run on {self.uri} yet: waiting for one")
        else:
            yield from self._started()
        while not self._closed.is_set():
            try:
                source, generation, kind, detail = self._events.get(timeout=0.25)
            except queue.Empty:
                source, generation, kind, detail = "", 0, "tick", None
            if source and generation != self._generation[source]:
                continue  # from a subscription since replaced (another run, a reconnection)
            try:
                yield from self._handle(source, kind, detail)
                yield from self._maintain()
            except (InputError, StreamLostError):
                raise
            except Exception as exc:
                if self._is_missing(exc):
                    # the run or its table is being written anew (a spool's rewrite after an
                    # outage): subscribe again once it is back
                    self._drop_table()
                    self._retry_at["table"] = time.monotonic() + _RETRY_MIN_S
                    continue
                if not self._is_connection_error(exc):
                    raise
                yield from self._lost("catalog", exc)  # the server went away: retried later
            if self.run is not None and self.run.finished and not self.follow:
                return

    def _started(self) -> Iterator[WatchEvent]:
        assert self.run is not None
        run = self.run
        parent = f" (analysis of {run.parent_uid[:8]})" if run.parent_uid else ""
        yield WatchEvent("run", run, f"watching derived run {run.uid}{parent}")
        new = self._catch_up()
        if _n(new):
            yield WatchEvent("rows", run, run.describe(), new)
        if run.finished:
            yield self._finished_event()

    def _finished_event(self) -> WatchEvent:
        assert self.run is not None
        status = self.run.exit_status or "unknown"
        return WatchEvent(
            "finished", self.run, f"run {self.run.uid[:8]} ended ({status}): {self.run.describe()}"
        )

    def _handle(self, source: str, kind: str, detail: Any) -> Iterator[WatchEvent]:
        run = self.run
        if kind == "rows" and run is not None and not run.finished:
            new = run.merge(detail)
            if _n(new):
                yield WatchEvent("rows", run, run.describe(), new, via="stream")
        elif kind == "connected":
            was_lost = self._lost_since is not None
            self._stream_ok[source] = True
            # The catalog's socket may come back while a live run's table is still cut off (its
            # stream cache down): the outage goes on, and is reported once.
            if all(self._stream_ok.values()) or (source == "catalog" and (run is None or run.finished)):
                self._lost_since = None
            if run is not None and not run.finished and source == "table":
                new = self._catch_up()
                if was_lost:
                    message = f"stream back; {_n(new)} rows read from the catalog that it missed"
                    yield WatchEvent("resumed", run, message, new)
                elif _n(new):  # stored before the subscription began
                    yield WatchEvent("rows", run, run.describe(), new)
            if run is not None and source == "catalog" and self._check_stop():
                yield from self._finish()
        elif kind == "lost":
            yield from self._lost(source, detail)
        elif kind == "failed":
            if self._is_refusal(detail):
                raise InputError(
                    f"the Tiled server at {self.uri} refused the stream ({detail}); check the API key"
                )
            yield from self._lost(source, detail)
        elif kind == "ended":
            self._stream_ok[source] = False
            if source == "table" and run is not None and not run.finished and self._check_stop():
                # TiledWriter closes the table's stream after it writes the stop document: the
                # close may come before the catalog's update says so (two sockets)
                self._table_sub = None
                yield from self._finish()
                return
            if source == "catalog":
                self._catalog_sub = None
            elif self._table_sub is not None:
                self._table_sub = None
            if not self._closed.is_set() and (run is None or not run.finished or self.follow):
                if self._lost_since is None:
                    yield from self._lost(source, None)
                self._retry_at[source] = time.monotonic() + _RETRY_MIN_S
        elif kind == "child" and (run is None or (run.finished and self.follow)):
            self._drop_table()
            self.run = self._open_run(str(detail))
            yield from self._started()
        elif kind == "updated" and run is not None:
            key, metadata = detail
            if key == run.uid and (metadata or {}).get("stop") and not run.finished:
                stop = metadata["stop"]
                run.finished, run.exit_status = True, stop.get("exit_status")
                yield from self._finish()

    def _finish(self) -> Iterator[WatchEvent]:
        """The run ended: read what the stream did not bring (so the rows are the stored ones)."""
        assert self.run is not None
        new = self._catch_up()
        if _n(new):
            yield WatchEvent("rows", self.run, self.run.describe(), new)
        yield self._finished_event()
        self._drop_table()
        if self.follow:
            yield WatchEvent("waiting", self.run, "waiting for the next derived run")

    def _lost(self, source: str, detail: Any) -> Iterator[WatchEvent]:
        self._stream_ok[source] = False
        if self._lost_since is None:
            self._lost_since = time.monotonic()
            yield WatchEvent(
                "lost",
                self.run,
                f"live stream from {self.uri} lost: {_describe_loss(detail)}; reconnecting, and reading "
                f"the catalog every {self.poll_s:g} s meanwhile (Ctrl-C to stop)",
            )

    def _maintain(self) -> Iterator[WatchEvent]:
        """Subscribe what is not subscribed; while the stream is cut off, read the catalog."""
        now = time.monotonic()
        if self._catalog_sub is None and now >= self._retry_at["catalog"]:
            self._subscribe_catalog()
        run = self.run
        if (
            run is not None
            and not run.finished
            and self._table_sub is None
            and now >= self._retry_at["table"]
        ):
            if self._table_node is not None or self._find_table():
                self._subscribe_table()
                self._retry_at["table"] = now
            else:
                self._retry_at["table"] = now + 0.5  # no rows yet: look again shortly
        if self._lost_since is not None:
            if self.give_up_s is not None and now - self._lost_since > self.give_up_s:
                raise StreamLostError(
                    f"the Tiled server at {self.uri} has been unreachable for {self.give_up_s:g} s; "
                    "is it running? (the scan's rows are stored all the same)"
                )
            if run is not None and not run.finished and now - self._last_poll >= self.poll_s:
                self._last_poll = now
                new = self._catch_up()
                if _n(new):
                    yield WatchEvent("polling", run, run.describe(), new)
                if self._check_stop():
                    yield from self._finish()

    @staticmethod
    def _is_connection_error(exc: BaseException) -> bool:
        import httpx

        return isinstance(exc, httpx.TransportError | ConnectionError | OSError) or (
            isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500
        )

    @staticmethod
    def _is_missing(exc: BaseException) -> bool:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return isinstance(exc, KeyError) or status == 404

    @staticmethod
    def _is_refusal(exc: BaseException) -> bool:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status in (401, 403)

    def close(self) -> None:
        """Stop following (from any thread); :meth:`events` returns."""
        self._closed.set()
        self._drop_table()
        sub, self._catalog_sub = self._catalog_sub, None
        self._generation["catalog"] += 1
        if sub is not None:
            threading.Thread(target=sub.disconnect, kwargs={"wait": False}, daemon=True).start()

    def __enter__(self) -> DerivedRunWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _has_display() -> bool:
    import os
    import sys

    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class _Maps:
    """The live ε/ω/χ maps of the watched run in a matplotlib window (LiveStrainMaps, fed rows)."""

    def __init__(self) -> None:
        import matplotlib.pyplot as plt

        from ..callbacks import LiveStrainMaps

        self._plt = plt
        self.figure = plt.figure(figsize=(13.2, 4.0), layout="constrained")
        self.maps = LiveStrainMaps(None, figure=self.figure, redraw_period_s=0.5)
        self._uid: str | None = None
        plt.show(block=False)

    def update(self, event: WatchEvent) -> None:
        run = event.run
        if run is None:
            return
        if run.uid != self._uid:
            self._uid = run.uid
            self.maps.start({**run.start, "uid": run.uid})
            self.maps.descriptor({"uid": "watch", "name": STREAM})
        rows = event.new_rows
        if rows and _n(rows):
            self.maps.event_page({"descriptor": "watch", "data": rows, "seq_num": rows[_row_key(rows)]})
        if event.kind == "finished":
            self.maps.stop({"uid": "watch-stop", "run_start": run.uid})

    def pump(self, seconds: float) -> bool:
        """Let the window draw and answer for ``seconds``; False once it has been closed."""
        if not self._plt.fignum_exists(self.figure.number):
            return False
        self.figure.canvas.draw_idle()
        self._plt.pause(seconds)
        return True


def watch_run(
    uri: str,
    *,
    api_key: str | None = None,
    run: str | None = None,
    follow: bool = False,
    plot: bool = True,
    out: Any = None,
    give_up_s: float | None = None,
) -> DerivedRunWatcher:
    """``nanobeam watch``: progress lines (and maps, with a display) of a derived run, live.

    Returns the watcher when the run has ended (with ``follow``: on Ctrl-C, or when the maps'
    window is closed); its ``run`` holds the rows received.
    """
    import sys

    out = out or sys.stdout
    watcher = DerivedRunWatcher(uri, api_key=api_key, run=run, follow=follow, give_up_s=give_up_s)
    maps = None
    if plot:
        if _has_display():
            maps = _Maps()
        else:
            print("no display: maps not drawn (give --no-plot to say so)", file=out, flush=True)
    events: queue.Queue[WatchEvent | BaseException | None] = queue.Queue()

    def produce() -> None:
        try:
            for event in watcher.events():
                events.put(event)
        except BaseException as exc:  # handed to the main thread, which raises it
            events.put(exc)
        finally:
            events.put(None)

    threading.Thread(target=produce, daemon=True, name="watch-events").start()
    last_line = 0.0
    try:
        while True:
            try:
                item = events.get(timeout=0.1 if maps else 0.5)
            except queue.Empty:
                if maps is not None and not maps.pump(0.05):
                    break
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            now = time.monotonic()
            # progress at most once a second; everything else at once
            if item.kind not in ("rows", "polling") or now - last_line >= 1.0:
                print(item.message, file=out, flush=True)
                last_line = now
            if maps is not None:
                maps.update(item)
                if not maps.pump(0.01):
                    break
    finally:
        watcher.close()
    if maps is not None and watcher.run is not None and watcher.run.finished and not follow:
        print("run ended: close the maps' window to quit", file=out, flush=True)
        while maps.pump(0.2):
            pass
    return watcher
