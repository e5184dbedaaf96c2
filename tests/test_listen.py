"""``nanobeam listen`` out of process, through a real bluesky-0MQ-proxy on loopback, storing the
derived runs in a real Tiled server's /derived catalog (``--tiled``)."""

from __future__ import annotations

import os
import pickle
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
import zmq
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from event_model import DocumentNames, schema_validators
from ophyd_async.core import init_devices

import nanobeam_bluesky
from nanobeam_bluesky.devices import FrameSimulator, NanoprobeStage, NanoprobeStepDetector
from nanobeam_bluesky.tiled.server import ServerConfig, TiledServer, free_port

N = 8
PIXEL_UM = 0.1


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop(process: subprocess.Popen, sig: int = signal.SIGINT) -> str:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.stdout.read() if process.stdout else ""


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Read the process's stdout until a line contains ``text``; fail on exit or timeout."""
    lines: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            lines.append(line)
            if text in line:
                return lines
    raise AssertionError(f"no {text!r} from {process.args} within {timeout} s; output: {''.join(lines)}")


class DerivedSubscriber:
    """A 0MQ SUB socket on the proxy's out-address that keeps only derived documents."""

    def __init__(self, address: str, prefix: bytes = b"nanobeam") -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.connect(address)
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix + b" ")
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def wait_for_stop(self, parent_uid: str, timeout: float) -> list[tuple[str, dict[str, Any]]] | None:
        """The derived documents of the raw run ``parent_uid``, once its stop arrived."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run_of(parent_uid)
            if run and run[-1][0] == "stop":
                return run
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self.socket.poll(int(min(remaining, 0.2) * 1000)):
                _, name, payload = self.socket.recv().split(b" ", 2)
                self.docs.append((name.decode(), pickle.loads(payload)))

    def run_of(self, parent_uid: str) -> list[tuple[str, dict[str, Any]]]:
        starts = {d["uid"] for n, d in self.docs if n == "start" and d.get("parent_uid") == parent_uid}
        descriptors = {d["uid"] for n, d in self.docs if n == "descriptor" and d["run_start"] in starts}
        return [
            (n, d)
            for n, d in self.docs
            if (n == "start" and d["uid"] in starts)
            or (n in ("descriptor", "stop") and d["run_start"] in starts)
            or (n == "event_page" and d["descriptor"] in descriptors)
        ]

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def tiled_server(workdir: Path) -> Iterator[TiledServer]:
    with TiledServer(ServerConfig(data_dir=workdir / "tiled", port=free_port())) as server:
        yield server


@pytest.fixture
def proxy_and_listener(
    model, workdir: Path, tiled_server: TiledServer
) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """A bluesky-0MQ-proxy and a ``nanobeam listen --tiled`` attached to it (addresses: in, out)."""
    in_port, out_port = _free_ports(2)
    in_address, out_address = f"tcp://127.0.0.1:{in_port}", f"tcp://127.0.0.1:{out_port}"
    proxy_exe = (
        shutil.which("bluesky-0MQ-proxy", path=str(Path(sys.executable).parent)) or "bluesky-0MQ-proxy"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(nanobeam_bluesky.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proxy = subprocess.Popen(
        [proxy_exe, "--in-address", in_address, "--out-address", out_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    command = [
        sys.executable,
        "-m",
        "nanobeam_bluesky.cli",
        "listen",
        "--from",
        out_address,
        "--to",
        in_address,
        "--maps",
        str(workdir / "maps"),
        "--tiled",
        tiled_server.url,
        "--api-key",
        tiled_server.api_key,
        "--spool",
        str(workdir / "spool"),
    ]
    if model.path is not None:
        command += ["--model", str(model.path)]
    listener = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_line(listener, "ready", timeout=120)
        yield in_address, out_address, listener
    finally:
        _stop(listener)
        _stop(proxy, signal.SIGTERM)


def test_listen_analyses_scans_through_the_0mq_proxy(
    model, phantom, proxy_and_listener, tiled_server: TiledServer, workdir: Path
) -> None:
    in_address, out_address, listener = proxy_and_listener
    RE = RunEngine({})
    sample = phantom(N, PIXEL_UM)
    with init_devices():
        stage = NanoprobeStage()
    det = NanoprobeStepDetector(FrameSimulator(sample, seed=11), stage, name="det")
    publisher = Publisher(in_address.removeprefix("tcp://"))
    RE.subscribe(publisher)
    raw: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: raw.append((name, doc)))
    derived = DerivedSubscriber(out_address)
    try:
        # Slow joiners: 0MQ drops what is sent before every link is up. One-frame runs until a
        # derived run comes back prove the chain RunEngine -> proxy -> listener -> proxy -> us.
        for warmups in range(1, 61):  # noqa: B007 (reported below)
            (uid,) = RE(bp.count([det]))
            if derived.wait_for_stop(uid, timeout=1.0):
                break
        else:
            pytest.fail("no derived run came back through the proxy within 60 warm-up scans")

        last = (N - 1) * PIXEL_UM
        (uid,) = RE(bp.grid_scan([det], stage.y, 0, last, N, stage.x, 0, last, N))
        run = derived.wait_for_stop(uid, timeout=120)
        assert run is not None, "the derived run of the grid scan did not arrive"
    finally:
        publisher.close()
        derived.close()

    for name, doc in run:
        schema_validators[DocumentNames[name]].validate(doc)
    names = [n for n, _ in run]
    assert names[0] == "start" and names[1] == "descriptor" and names[-1] == "stop"
    start, stop = run[0][1], run[-1][1]
    assert start["parent_uid"] == uid and start["nanobeam"]["model_sha256"] == model.predictor.sha256
    pages = [d for n, d in run if n == "event_page"]
    rows = {k: np.concatenate([p["data"][k] for p in pages]) for k in pages[0]["data"]}
    raw_stop = next(d for n, d in raw if n == "stop" and d["run_start"] == uid)
    assert stop["num_events"]["primary"] == raw_stop["num_events"]["primary"] == N * N
    assert sorted(rows["raw_seq_num"].tolist()) == list(range(1, N * N + 1))
    # The same model in another process: its maps follow the phantom.
    truth = sample.values_at(rows["stage-x"], rows["stage-y"])
    assert np.corrcoef(rows["omega"], truth[1])[0, 1] > 0.9
    assert np.corrcoef(rows["chi"], truth[2])[0, 1] > 0.9

    output = _stop(listener)
    assert "stopped after" in output, output
    # --tiled: the derived run is stored in /derived (the listener wrote it before it exited).
    from nanobeam_bluesky.tiled.catalog import derived_runs

    runs = tiled_server.client("runs")
    (stored_uid,) = derived_runs(runs, uid)
    stored = tiled_server.client("derived")[stored_uid]
    assert stored_uid == start["uid"] and stored.metadata["stop"]["exit_status"] == stop["exit_status"]
    np.testing.assert_array_equal(stored["primary"]["strain"].read(), rows["strain"])
    assert len(runs) == 0 and not list((workdir / "spool").glob("*.msgpack"))
    print(f"derived run back after {warmups} warm-up scan(s); listener said: {output.strip()}")
    assert list((workdir / "maps").glob("*-nanobeam-maps.png"))
