"""Writing runs to Tiled without ever blocking or losing them: a durable local spool.

bluesky-tiled-plugins' ``TiledWriter`` writes on the thread that calls it. Subscribed to the
RunEngine, a Tiled outage therefore stalls the RunEngine while the client retries (up to 45 s per
request), which times out ophyd-async devices and aborts scans; after its retries it gives up on
the run. :class:`SpooledTiledWriter` puts a local, append-only spool between the two:

* The calling thread (the RunEngine's, or the live callback's) only appends the document to the
  run's spool file (``<spool>/<run uid>.msgpack``, msgpack with numpy arrays kept exactly, flushed
  to the operating system at every document and fsync'ed at every stop) and returns.
* A writer thread feeds the spooled documents, in order, to one ``TiledWriter`` per run.
* When a write fails (Tiled is down, a network fault), that run waits: the thread probes Tiled's
  ``/healthz`` and, once it answers, deletes whatever part of the run reached Tiled and writes the
  whole run again from its spool, in order. Each document ends up in Tiled exactly once, however
  long the outage and whatever was half-written when it began. Runs that started during the
  outage are written when Tiled is back; a run still being acquired then continues live.
* A spool file is deleted once its run is completely in Tiled (``keep=True`` keeps it). Spool
  files left by a process that died are written by :meth:`recover` (``nanobeam`` does it when a
  writer starts on the same spool directory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import msgpack_numpy

__all__ = ["RunSpool", "SpooledTiledWriter"]

logger = logging.getLogger(__name__)

_SUFFIX = ".msgpack"


@dataclass
class RunSpool:
    """The spool of one run and how far it has reached Tiled."""

    uid: str
    path: Path
    #: Documents appended to the spool file.
    spooled: int = 0
    #: Documents handed to this run's current TiledWriter without an error.
    written: int = 0
    #: The current TiledWriter failed: the run waits for Tiled and is then written again whole.
    broken: bool = False
    #: Times the run was written again from its spool after an outage.
    rewrites: int = 0
    #: The stop document has been spooled.
    stopped: bool = False
    #: Every document, stop included, is in Tiled.
    done: bool = False
    last_error: str = ""
    _out: Any = field(default=None, repr=False)
    _reader: Any = field(default=None, repr=False)
    _in: Any = field(default=None, repr=False)
    _writer: Any = field(default=None, repr=False)


class SpooledTiledWriter:
    """A TiledWriter that never blocks its caller and never loses a document (see the module).

    Subscribe it to the RunEngine and to the live callback's derived documents, like a
    ``TiledWriter``.

    Args:
        catalog: the run catalog (a tiled client or its URI).
        spool_dir: where the per-run spool files live (a local disk).
        writer_factory: makes the TiledWriter for one run (default:
            :func:`nanobeam_bluesky.tiled.catalog.tiled_writer` on ``catalog``).
        probe_interval_s: how often to ask Tiled whether it is back, while a run waits.
        keep: keep each spool file after its run is in Tiled.
        api_key: for a catalog given as a URI.
    """

    def __init__(
        self,
        catalog: Any,
        spool_dir: str | Path,
        *,
        writer_factory: Any = None,
        probe_interval_s: float = 2.0,
        keep: bool = False,
        api_key: str | None = None,
        **writer_kwargs: Any,
    ) -> None:
        from .catalog import tiled_writer

        # A URI is connected to lazily, from the writer thread: Tiled may be down right now.
        self._catalog = None if isinstance(catalog, str) else catalog
        self._catalog_uri = catalog if isinstance(catalog, str) else str(catalog.uri)
        self._api_key = api_key
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.probe_interval_s = probe_interval_s
        self.keep = keep
        self._factory = writer_factory or (lambda: tiled_writer(self.catalog, **writer_kwargs))
        self._runs: dict[str, RunSpool] = {}
        self._order: list[str] = []  # runs in the order they started
        self._descriptor_run: dict[str, str] = {}
        self._resource_run: dict[str, str] = {}
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.recover()

    @property
    def catalog(self) -> Any:
        """The run catalog's tiled client (connected on first use)."""
        if self._catalog is None:
            from .catalog import open_catalog

            self._catalog = open_catalog(self._catalog_uri, api_key=self._api_key)
        return self._catalog

    # ------------------------------------------------------------------ the caller's side
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Spool one document (any thread); it reaches Tiled from the writer thread."""
        try:
            with self._lock:
                uid = self._run_of(name, doc)
                if uid is None:
                    logger.warning("SpooledTiledWriter: a %s document of no known run was not stored", name)
                    return
                run = self._runs.get(uid)
                if run is None:
                    run = self._open_run(uid)
                run._out.write(msgpack.packb((name, doc), default=msgpack_numpy.encode))
                run._out.flush()
                if name == "stop":
                    os.fsync(run._out.fileno())
                    run.stopped = True
                run.spooled += 1
                self._lock.notify_all()
            self._ensure_thread()
        except Exception:  # never fail the RunEngine or the live callback
            logger.exception("SpooledTiledWriter could not spool a %s document", name)

    def _run_of(self, name: str, doc: dict[str, Any]) -> str | None:
        """The run a document belongs to (called with the lock held)."""
        if name == "start":
            return doc["uid"]
        if name in ("stop", "descriptor"):
            uid = doc["run_start"]
            if name == "descriptor":
                self._descriptor_run[doc["uid"]] = uid
            return uid
        if name in ("event", "event_page", "stream_datum"):
            return self._descriptor_run.get(doc["descriptor"])
        if name in ("resource", "stream_resource"):
            uid = doc.get("run_start") or (self._order[-1] if self._order else None)
            if uid is not None:
                self._resource_run[doc["uid"]] = uid
            return uid
        if name in ("datum", "datum_page"):
            return self._resource_run.get(doc["resource"])
        return None

    def _open_run(self, uid: str) -> RunSpool:
        path = self.spool_dir / f"{uid}{_SUFFIX}"
        run = RunSpool(uid, path)
        run._out = open(path, "ab")
        self._runs[uid] = run
        self._order.append(uid)
        return run

    # ------------------------------------------------------------------ state
    def status(self) -> dict[str, dict[str, Any]]:
        """Per run: documents spooled and written, whether it waits for Tiled, and why."""
        with self._lock:
            return {
                uid: {
                    "spooled": r.spooled,
                    "written": r.written,
                    "waiting": r.broken,
                    "rewrites": r.rewrites,
                    "done": r.done,
                    "error": r.last_error,
                }
                for uid, r in self._runs.items()
            }

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every document spooled so far is in Tiled; False if ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while any(r.written < r.spooled or r.broken for r in self._runs.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.2 if left is None else min(0.2, left))
        return True

    def close(self, timeout: float | None = 30.0) -> bool:
        """Write what can be written within ``timeout``, then stop the writer thread.

        Returns True when everything spooled is in Tiled; what is not stays in the spool and is
        written by the next writer on this spool directory (:meth:`recover`).
        """
        complete = self.flush(timeout)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for run in self._runs.values():
                for handle in (run._out, run._in):
                    if handle is not None:
                        with contextlib.suppress(Exception):
                            handle.close()
        return complete

    def recover(self) -> list[str]:
        """Queue the runs that an earlier process left in the spool directory (they are written
        whole, replacing any part already in Tiled)."""
        found = []
        for path in sorted(self.spool_dir.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime):
            uid = path.name[: -len(_SUFFIX)]
            if uid in self._runs:
                continue
            count = 0
            stopped = False
            with open(path, "rb") as fh:
                for name, _ in msgpack.Unpacker(fh, object_hook=msgpack_numpy.decode, raw=False):
                    count += 1
                    stopped = stopped or name == "stop"
            run = self._open_run(uid)
            run.spooled, run.stopped, run.broken = count, stopped, True  # replace what is in Tiled
            found.append(uid)
        if found:
            logger.warning(
                "SpooledTiledWriter: %d run(s) from an earlier session are in the spool %s; "
                "writing them to Tiled",
                len(found),
                self.spool_dir,
            )
            self._ensure_thread()
        return found

    # ------------------------------------------------------------------ the writer thread
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._work, name="nanobeam-tiled-spool", daemon=True
                    )
                    self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                runs = [self._runs[u] for u in self._order]
                pending = [r for r in runs if r.written < r.spooled or r.broken]
                if not pending:
                    self._lock.wait(1.0)
                    continue
            # After a failure, touch Tiled again only once it answers.
            if any(r.broken for r in pending) and not self._tiled_answers():
                with self._lock:
                    self._lock.wait(self.probe_interval_s)
                continue
            for run in pending:
                try:
                    self._feed(run)
                except Exception as exc:  # Tiled (or the network) failed mid-run
                    with self._lock:
                        run.broken = True
                        run.last_error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "SpooledTiledWriter: run %s waits for Tiled (%s); its %d documents are safe in %s",
                        run.uid,
                        run.last_error,
                        run.spooled,
                        run.path,
                    )
                    break

    def _feed(self, run: RunSpool) -> None:
        """Hand the run's unwritten documents to its TiledWriter, in order."""
        if run.broken or run._writer is None:
            self._restart(run)
        while True:
            with self._lock:
                if run.written >= run.spooled:
                    if run.stopped and not run.done:
                        self._finish(run)
                    return
            name, doc = next(run._reader)
            run._writer(name, doc)
            with self._lock:
                run.written += 1
                self._lock.notify_all()

    def _restart(self, run: RunSpool) -> None:
        """A fresh TiledWriter for the run, from the first spooled document, replacing any part of
        the run already in Tiled."""
        if run.broken:  # part of the run may be in Tiled: replace it
            with contextlib.suppress(Exception):
                if run.uid in self.catalog:
                    self.catalog.delete_contents(run.uid, recursive=True, external_only=False)
            run.rewrites += 1
        if run._in is not None:
            run._in.close()
        run._in = open(run.path, "rb")
        run._reader = iter(
            msgpack.Unpacker(run._in, object_hook=msgpack_numpy.decode, raw=False, max_buffer_size=0)
        )
        run._writer = self._factory()
        with self._lock:
            run.written = 0
            run.broken = False
            run.done = False

    def _finish(self, run: RunSpool) -> None:
        run.done = True
        if run._in is not None:
            run._in.close()
            run._in = None
        if run._out is not None:
            run._out.close()
            run._out = None
        if not self.keep:
            with contextlib.suppress(OSError):
                run.path.unlink()
        logger.info(
            "SpooledTiledWriter: run %s is in Tiled (%d documents%s)",
            run.uid,
            run.written,
            f", written again {run.rewrites}x after outages" if run.rewrites else "",
        )

    def _tiled_answers(self) -> bool:
        """Tiled's /healthz within 2 s (no retries: this is the probe)."""
        import httpx

        base = self._catalog_uri.split("/api/")[0].rstrip("/")
        try:
            return httpx.get(f"{base}/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
