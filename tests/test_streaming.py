"""Derived rows streamed by Tiled to a watcher on "another machine" (only the URI and the key).

Real components: ``nanobeam serve`` processes (the in-memory stream store, and a real
``redis-server``), the RunEngine with simulated devices, the live callback writing the derived
run with TiledWriter, and ``nanobeam watch`` (its Python API and the command). Timings never
decide pass or fail: the assertions are on the rows the watcher holds against the stored ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nanobeam_bluesky.errors import InputError
from nanobeam_bluesky.physics import simulate, to_counts
from nanobeam_bluesky.tiled import DerivedRunWatcher, RedisServer, SpooledTiledWriter, WatchEvent
from nanobeam_bluesky.tiled._redis import find_redis_server
from nanobeam_bluesky.tiled.catalog import derived_catalog, tiled_writer
from nanobeam_bluesky.tiled.server import API_KEY_ENV, ServerConfig, TiledServer, free_port

WORKTREE = Path(__file__).resolve().parents[1]
# tiled's stream client calls websockets' connect() without a `with` (websockets >= 17.1 warns)
pytestmark = pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"
)
NY, NX = 4, 4
COLUMNS = ("strain", "omega", "chi", "strain_err", "flag", "raw_seq_num")


def _redis_or_skip() -> None:
    try:
        find_redis_server()
    except InputError as exc:  # CI installs it (.ci/run); elsewhere say what is missing
        pytest.skip(f"redis-server not installed: {exc}")


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    _redis_or_skip()
    with RedisServer(tmp_path_factory.mktemp("redis"), port=free_port()) as server:
        yield server


def _server(root: Path, **options) -> TiledServer:
    config = ServerConfig(data_dir=root, port=free_port(), lazy_library=False, **options)
    return TiledServer(config, env={"PYTHONPATH": str(WORKTREE)})


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory):
    with _server(tmp_path_factory.mktemp("stream-memory")) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory, redis):
    with _server(tmp_path_factory.mktemp("stream-redis"), stream_cache=redis.uri) as server:
        yield server


@pytest.fixture(scope="module")
def sentinel_server(tmp_path_factory, redis):
    """The stream through Redis Sentinel, as a facility runs it: a real sentinel process
    (``redis-server --sentinel``) watching the Redis above as service "nanobeam"."""
    directory = tmp_path_factory.mktemp("sentinel")
    port = free_port()
    conf = directory / "sentinel.conf"  # the sentinel rewrites its config: a file of its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor nanobeam 127.0.0.1 {redis.port} 1\n"
        "sentinel down-after-milliseconds nanobeam 60000\n"
    )
    sentinel = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        probe = RedisServer(directory, port=port)  # only its PING
        deadline = time.monotonic() + 20
        while not probe.ping():
            assert sentinel.poll() is None and time.monotonic() < deadline, "redis sentinel did not start"
            time.sleep(0.05)
        with _server(
            tmp_path_factory.mktemp("stream-sentinel"),
            redis_sentinels=(f"127.0.0.1:{port}",),
            redis_service="nanobeam",
        ) as server:
            yield server
    finally:
        sentinel.terminate()
        sentinel.wait(10)


def _detector(x, y):
    import ophyd.sim

    rng = np.random.default_rng(3)

    class FrameSignal(ophyd.sim.SynSignal):
        def describe(self):
            description = super().describe()
            description[self.name]["dtype_numpy"] = "<u2"
            return description

    def frame():
        counts = to_counts(simulate(0.002 * x.position, 0.02 * y.position, 0.0), 7.0, scale=1.0, rng=rng)
        return counts[0].astype(np.uint16)

    return FrameSignal(func=frame, name="nanobeam_image", labels={"detectors"})


class _Watching:
    """A watcher consuming its events in a thread, as ``nanobeam watch`` does."""

    def __init__(self, url: str, api_key: str, **kwargs) -> None:
        self.watcher = DerivedRunWatcher(url, api_key=api_key, poll_s=0.5, **kwargs)
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._consume, daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        try:
            for event in self.watcher.events():
                self.events.append(event)
        except BaseException as exc:
            self.error = exc

    def wait_for_rows(self, parent_uid: str, timeout: float = 60.0) -> None:
        """Until the watcher holds rows of the analysis of ``parent_uid`` (the scan's gate: the
        later rows must come through the stream)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.watcher.run
            if run is not None and run.parent_uid == parent_uid and run.n_rows > 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"the watcher saw no rows in {timeout} s: {self.events}")

    def join(self, parent_uid: str, timeout: float = 120.0) -> None:
        """Until the watcher has seen the analysis of ``parent_uid`` end; then it is closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.error is None and not self._ended(parent_uid):
            time.sleep(0.05)
        self.watcher.close()
        self.thread.join(30)
        if self.error is not None:
            raise self.error
        if not self._ended(parent_uid):
            raise AssertionError(f"the watcher did not see the run end: {[e.message for e in self.events]}")
        # from here on, the events of that run only (a module's server holds earlier runs)
        first = next(i for i, e in enumerate(self.events) if e.run and e.run.parent_uid == parent_uid)
        self.events = [e for e in self.events[first:] if e.run is None or e.run.parent_uid == parent_uid]

    def _ended(self, parent_uid: str) -> bool:
        events = list(self.events)
        return any(e.kind == "finished" and e.run and e.run.parent_uid == parent_uid for e in events)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def _scan(server, model, *, derived_writer=None, raw_writer=None, at_event=None):
    """A 4 x 4 grid scan analysed live; ``at_event(seq_num, uid)`` runs in the RunEngine's thread."""
    import bluesky.plans as bp
    import ophyd.sim
    from bluesky import RunEngine

    from nanobeam_bluesky.callbacks import NanobeamCallback

    runs = server.client("runs")
    x, y = ophyd.sim.SynAxis(name="x"), ophyd.sim.SynAxis(name="y")
    callback = NanobeamCallback(model.predictor)
    callback.subscribe(derived_writer or tiled_writer(derived_catalog(runs), batch_size=2))
    RE = RunEngine({})
    RE.subscribe(raw_writer or tiled_writer(runs, batch_size=4))
    RE.subscribe(callback)
    scan: dict[str, str] = {}
    RE.subscribe(lambda name, doc: scan.update(uid=doc["uid"]) if name == "start" else None)
    if at_event is not None:
        RE.subscribe(lambda name, doc: at_event(doc["seq_num"], scan["uid"]) if name == "event" else None)
    (uid,) = RE(bp.grid_scan([_detector(x, y)], y, -1, 1, NY, x, -1, 1, NX))
    assert callback.flush(timeout=120)
    callback.close()
    return uid


def _assert_rows_are_the_stored_ones(watching: _Watching, server: TiledServer) -> None:
    run = next(e.run for e in watching.events if e.kind == "finished")
    assert run is not None and run.finished and run.exit_status == "success"
    stored = server.client("derived")[run.uid]["primary"]
    table = run.table()
    assert run.n_rows == NY * NX
    np.testing.assert_array_equal(table["raw_seq_num"], np.arange(1, NY * NX + 1))
    for key in COLUMNS:
        np.testing.assert_array_equal(table[key], stored[key].read(), err_msg=key)
    assert run.n_flagged == int(np.count_nonzero(stored["flag"].read()))


@pytest.mark.parametrize("store", ["memory", "redis", "sentinel"])
def test_derived_rows_reach_a_watcher_as_they_are_written(store, request, model):
    server = request.getfixturevalue(f"{store}_server")
    # follow: the module's server may hold earlier runs; the newest then is one of those
    watching = _Watching(server.url, server.api_key, follow=True)

    def gate(seq_num, uid):  # midway, hold the scan until the watcher has the run's first rows
        if seq_num == 6:
            watching.wait_for_rows(uid)

    uid = _scan(server, model, at_event=gate)
    watching.join(uid)
    _assert_rows_are_the_stored_ones(watching, server)
    assert next(e.run for e in watching.events if e.kind == "finished").parent_uid == uid
    streamed = sum(
        len(e.new_rows["raw_seq_num"]) for e in watching.events if e.new_rows and e.via == "stream"
    )
    # rows written after the watcher subscribed came through the stream, not from the catalog
    assert streamed >= NY * NX - 6, [(e.kind, e.via, e.message) for e in watching.events]
    (finished,) = [e for e in watching.events if e.kind == "finished"]
    assert "lost" not in watching.kinds() and watching.kinds()[0] == "run"
    assert "16/16 rows" in finished.message and "deg" in finished.message
    if store != "memory":  # the rows went through the Redis (found via the sentinel there)
        import hashlib

        import redis as redis_client

        database = server.config.derived_database()
        namespace = f"nanobeam:derived:{hashlib.sha256(database.encode()).hexdigest()[:12]}"
        port = request.getfixturevalue("redis").port
        assert redis_client.Redis(port=port).keys(f"*{namespace}:*"), namespace


def test_watch_command_prints_progress_and_the_end(memory_server, model):
    uid = _scan(memory_server, model)
    env = {**os.environ, API_KEY_ENV: memory_server.api_key, "PYTHONPATH": str(WORKTREE)}
    result = subprocess.run(
        [sys.executable, "-m", "nanobeam_bluesky.cli", "watch", memory_server.url, "--run", uid, "--no-plot"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("watching derived run") and f"analysis of {uid[:8]}" in lines[0]
    assert "ended (success)" in lines[-1] and "16/16 rows" in lines[-1] and "flagged" in lines[-1]
    assert "Traceback" not in result.stderr


def test_a_server_restart_mid_scan_loses_no_row_at_the_watcher(memory_server, model, tmp_path, monkeypatch):
    import tiled.client.utils

    # the writers give up quickly during the outage; their spools store the rows when it is back
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 2.0)
    server = memory_server
    watching = _Watching(server.url, server.api_key, follow=True)
    raw_writer = SpooledTiledWriter(
        server.client("runs"), tmp_path / "spool", probe_interval_s=0.2, batch_size=4
    )
    derived_writer = SpooledTiledWriter(
        server.client("derived"), tmp_path / "spool-derived", probe_interval_s=0.2, batch_size=2
    )

    def outage(seq_num, uid):
        if seq_num == 5:
            watching.wait_for_rows(uid)
            server.stop()
        if seq_num == 10:
            server.start()

    try:
        uid = _scan(server, model, derived_writer=derived_writer, raw_writer=raw_writer, at_event=outage)
    finally:
        if not server.alive():
            server.start()
    assert raw_writer.flush(timeout=120) and derived_writer.flush(timeout=120)
    raw_writer.close()
    derived_writer.close()
    watching.join(uid, timeout=180)
    _assert_rows_are_the_stored_ones(watching, server)
    kinds = watching.kinds()
    # it said the stream was lost; what it missed came back (the resumed stream, the catalog reads
    # meanwhile or the read at the end: whichever came first) before it said the run ended
    assert "lost" in kinds and kinds.index("lost") < kinds.index("finished"), kinds


def test_redis_killed_mid_scan_the_scan_is_stored_and_watch_says_so(tmp_path, model):
    _redis_or_skip()
    with RedisServer(tmp_path / "redis", port=free_port()) as redis:
        server = _server(tmp_path / "tiled", stream_cache=redis.uri)
        with server:
            watching = _Watching(server.url, server.api_key)

            def kill_redis(seq_num, uid):
                if seq_num == 6:
                    watching.wait_for_rows(uid)
                    redis.kill()

            uid = _scan(server, model, at_event=kill_redis)
            watching.join(uid, timeout=180)
            # storage unaffected: every row stored, and the watcher holds them all (from the catalog)
            _assert_rows_are_the_stored_ones(watching, server)
            lost = [e.message for e in watching.events if e.kind == "lost"]
            assert len(lost) == 1 and "live stream" in lost[0], [e.message for e in watching.events]
            assert "stream cache (Redis) unavailable" in server.log_path.read_text()


def test_bad_input_gives_one_line(memory_server, model):
    server = memory_server
    with pytest.raises(InputError, match="refused the API key"):
        DerivedRunWatcher(server.url, api_key="wrong" * 4)
    with pytest.raises(InputError, match="no derived run 'no-such-run'"):
        DerivedRunWatcher(server.url, api_key=server.api_key, run="no-such-run")
    with pytest.raises(InputError, match="no Tiled server answers"):
        DerivedRunWatcher(f"http://127.0.0.1:{free_port()}", api_key=server.api_key)
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
    env.pop(API_KEY_ENV, None)
    env.pop("TILED_API_KEY", None)
    for args, expected in (
        (["--api-key", "wrong" * 4], "refused the API key"),
        (["--api-key", server.api_key, "--run", "no-such-run"], "no derived run"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "nanobeam_bluesky.cli", "watch", server.url, "--no-plot", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
