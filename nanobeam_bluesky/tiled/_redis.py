"""A local ``redis-server`` (the Debian package) as a child process: the stream cache of
``nanobeam serve --start-redis`` and of the tests.

It listens on loopback only, keeps nothing on disk (a stream cache holds seconds to an hour of
rows whose permanent copy is the catalog), and dies with its parent (``PR_SET_PDEATHSIG``), so a
killed server leaves no Redis behind.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import InputError

__all__ = ["RedisServer", "find_redis_server"]

_SEARCH = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str:
    """The ``redis-server`` executable, or an InputError that says how to get one."""
    found = shutil.which("redis-server") or next((p for p in _SEARCH if Path(p).is_file()), None)
    if found is None:
        raise InputError(
            "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu), or give a "
            "running one with --stream-cache redis://HOST:PORT/0, or keep the default --stream-cache memory"
        )
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port``, its working directory ``directory``.

    >>> with RedisServer(Path("redis"), port=free_port()) as redis:
    ...     print(redis.uri)  # redis://127.0.0.1:PORT/0
    """

    def __init__(self, directory: Path, port: int, *, host: str = "127.0.0.1") -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = int(port)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start it and wait until it answers PING (or fail with its log)."""
        executable = find_redis_server()
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.directory),
            "--save",
            "",  # no snapshots: the catalog holds the permanent copy
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # before uvicorn starts threads
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start-up:\n{self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer within {timeout} s:\n{self.log_tail()}")

    def ping(self) -> bool:
        """True if the server answers ``PING`` (plain RESP over a socket: no client library)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis exits at once without persistence), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: Redis going away without a goodbye (what the outage tests do)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
