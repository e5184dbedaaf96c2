"""``nanobeam serve``: one Tiled server with a writable run catalog, the library and scan files.

The server is plain ``tiled serve config`` with a config this module writes (it is kept in the
data directory, so the same server can be started with tiled's own command). Its tree::

    /runs        writable catalog (SQLite by default; PostgreSQL for a facility) that TiledWriter
                 writes the raw Bluesky runs to; event tables in SQLite/DuckDB/PostgreSQL,
                 arrays as Zarr in the data directory; detector files (StreamResource) are read
                 from the declared readable directories
    /derived     writable catalog of the derived (ε, ω, χ) runs, its own database: ``runs[-1]``
                 and ``runs[scan_id]`` keep meaning the scan, as every Bluesky tool expects
    /files       a catalog for ``tiled register``: experimental files indexed by MIME type
    /library     the simulated library file, if given
    /simulated   a library simulated on demand from an instrument config
    /scans       a directory of experimental scan files, listed live

Security: it listens on loopback unless told otherwise, every request needs the API key (at
least 16 characters), and only the declared files are served: the catalogs refuse assets that
resolve (symlinks, ``..``) outside their storage, the scan directory never follows links outside
itself, HDF5 files that link to other files (external links, virtual datasets, external raw
storage) are refused, ``instrument`` parameters are names, never paths, and raw asset download
is off (see ``nanobeam_bluesky.tiled.adapters._guard``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from .adapters import ADAPTERS_BY_MIMETYPE
from .catalog import API_KEY_ENV

__all__ = [
    "API_KEY_ENV",
    "DERIVED_PATH",
    "MIN_API_KEY_LENGTH",
    "RUNS_PATH",
    "ServerConfig",
    "TiledServer",
    "check_api_key",
    "ensure_catalog",
    "free_port",
    "resolve_api_key",
    "run_server",
    "server_config",
    "stream_cache_config",
    "write_server_config",
]

#: Shortest API key the server accepts (characters); the generated key has 64 (256 bits).
MIN_API_KEY_LENGTH = 16
_LOOPBACK_NAMES = {"localhost"}
RUNS_PATH = "runs"
DERIVED_PATH = "derived"


@dataclass(frozen=True)
class ServerConfig:
    """What ``nanobeam serve`` serves and where it keeps its state.

    Attributes:
        data_dir: catalog database, Zarr arrays, event tables, the config file, the API key.
        library: a library file from ``nanobeam simulate-library`` to serve at /library.
        lazy_library: serve a library simulated on demand at /simulated.
        instrument: instrument config (YAML/JSON) for /simulated and the scans' binning.
        lazy_grid_points: grid points per parameter of /simulated (default: the instrument's).
        scans: a directory of experimental scan files to serve at /scans.
        roi_center_px: (row, col) of the reflection's ROI centre on the scans' detector.
        roi, binning: ROI side in raw pixels and binning (default: the instrument's).
        scan_layout: dataset paths of the scan files (see ``ScanLayout``).
        readable: more directories the catalogs may read: where detectors write their HDF5
            files (fly scans register them as StreamResources), files to ``tiled register``.
        instruments: a directory of instrument configs (NAME.yaml/.yml/.json) that catalog
            entries may choose by name with the ``instrument`` parameter; without it they may
            only give an inline config or "default".
        catalog_uri: database of the run catalog; default ``sqlite:///<data_dir>/catalog.db``.
            A facility gives ``postgresql://user:${PGPASSWORD}@host/db``: ``${VAR}`` is expanded
            from the environment when the server starts, so no password lands in the config.
        files_catalog_uri: database of the /files catalog; default ``files.db`` next to the
            run catalog (for PostgreSQL: database ``nanobeam_files`` on the same server).
        derived_catalog_uri: database of the /derived catalog (derived runs); default
            ``derived.db`` next to the run catalog (PostgreSQL: database ``nanobeam_derived``).
        tables_uri: event-table storage; default SQLite in the data directory. Also
            ``duckdb:///...`` or ``postgresql://...``.
        host, port: where to listen; loopback by default.
        stream_cache: where the run catalogs publish every write for live subscribers
            (``node.subscribe()``, ``nanobeam watch``, the browser view): ``"memory"`` (default:
            in the server process; one process only), ``"redis://HOST:PORT/DB"`` (a Redis that
            several server processes share), or ``"none"`` (no streaming).
        redis_sentinels, redis_service: a facility's Redis Sentinels (``"HOST:PORT"``) and the
            name of the primary they monitor, instead of a ``redis://`` stream cache.
        start_redis: start a local ``redis-server`` (the Debian package) on a free loopback port
            for the stream cache, its working directory ``data_dir/redis``; it stops with the server.
        stream_ttl_s: how long the stream cache keeps a write for subscribers that reconnect
            (seconds; the catalog keeps it for good).
    """

    data_dir: Path
    library: Path | None = None
    lazy_library: bool = True
    instrument: Path | None = None
    lazy_grid_points: int | None = None
    scans: Path | None = None
    roi_center_px: tuple[float, float] | None = None
    roi: int | None = None
    binning: int | None = None
    scan_layout: dict[str, str] = field(default_factory=dict)
    readable: tuple[Path, ...] = ()
    instruments: Path | None = None
    catalog_uri: str | None = None
    files_catalog_uri: str | None = None
    derived_catalog_uri: str | None = None
    tables_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    stream_cache: str = "memory"
    redis_sentinels: tuple[str, ...] = ()
    redis_service: str | None = None
    start_redis: bool = False
    stream_ttl_s: int = 3600

    def __post_init__(self) -> None:
        _check_stream_cache(self)
        object.__setattr__(self, "redis_sentinels", tuple(self.redis_sentinels))
        for name in ("data_dir", "library", "instrument", "scans", "instruments"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().resolve())
        if self.library is not None and not self.library.is_file():
            raise FileNotFoundError(
                f"no library file at {self.library}; make one with "
                f"`nanobeam simulate-library --out {self.library}`"
            )
        if self.scans is not None and not self.scans.is_dir():
            raise FileNotFoundError(f"scan directory {self.scans} does not exist; create it first")
        if self.instrument is not None and not self.instrument.is_file():
            raise FileNotFoundError(f"no instrument config at {self.instrument}")
        if self.instruments is not None and not self.instruments.is_dir():
            raise FileNotFoundError(f"instrument directory {self.instruments} does not exist; create it")
        readable = tuple(Path(p).expanduser().resolve() for p in self.readable)
        for path in readable:
            if not path.is_dir():
                raise FileNotFoundError(f"readable directory {path} does not exist; create it first")
        object.__setattr__(self, "readable", readable)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def runs_url(self) -> str:
        """The URI of the run catalog, as users give it to ``from_uri`` / ``nanobeam replay``."""
        return f"{self.url}/api/v1/metadata/{RUNS_PATH}"

    @property
    def derived_url(self) -> str:
        """The URI of the derived-run catalog (``nanobeam replay`` and the live callback write there)."""
        return f"{self.url}/api/v1/metadata/{DERIVED_PATH}"

    @property
    def live_url(self) -> str:
        """The live-maps page (a browser; ``#key=KEY`` gives it the API key)."""
        return f"{self.url}/custom/live/"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config.yml"

    def catalog_database(self) -> str:
        """The run catalog's database URI."""
        return self.catalog_uri or f"sqlite:///{self.data_dir / 'catalog.db'}"

    def files_database(self) -> str:
        """The database of the /files catalog (next to the run catalog)."""
        return self._sibling_database(self.files_catalog_uri, "files")

    def derived_database(self) -> str:
        """The database of the /derived catalog (next to the run catalog)."""
        return self._sibling_database(self.derived_catalog_uri, "derived")

    def _sibling_database(self, given: str | None, name: str) -> str:
        if given:
            return given
        if self.catalog_uri and not self.catalog_uri.startswith("sqlite"):
            return self.catalog_uri.rsplit("/", 1)[0] + f"/nanobeam_{name}"
        return f"sqlite:///{self.data_dir / f'{name}.db'}"

    def readable_directories(self) -> list[str]:
        return [str(p) for p in ((self.scans,) if self.scans else ()) + self.readable]

    def to_args(self) -> list[str]:
        """The ``nanobeam serve`` arguments that recreate this config (API key excluded)."""
        args = ["--data-dir", str(self.data_dir), "--host", self.host, "--port", str(self.port)]
        if self.library:
            args += ["--library", str(self.library)]
        if not self.lazy_library:
            args += ["--no-lazy-library"]
        if self.instrument:
            args += ["--instrument", str(self.instrument)]
        if self.lazy_grid_points:
            args += ["--grid", str(self.lazy_grid_points)]
        if self.scans:
            args += ["--scans", str(self.scans)]
        if self.roi_center_px:
            args += ["--roi-center", *(str(v) for v in self.roi_center_px)]
        if self.roi:
            args += ["--roi", str(self.roi)]
        if self.binning:
            args += ["--binning", str(self.binning)]
        for key, value in self.scan_layout.items():
            args += ["--scan-dataset", f"{key}={value}"]
        for path in self.readable:
            args += ["--readable", str(path)]
        if self.instruments:
            args += ["--instruments", str(self.instruments)]
        if self.catalog_uri:
            args += ["--catalog-uri", self.catalog_uri]
        if self.files_catalog_uri:
            args += ["--files-catalog-uri", self.files_catalog_uri]
        if self.derived_catalog_uri:
            args += ["--derived-catalog-uri", self.derived_catalog_uri]
        if self.tables_uri:
            args += ["--tables-uri", self.tables_uri]
        if self.stream_cache != "memory" and not self.redis_sentinels:
            args += ["--stream-cache", self.stream_cache]
        for sentinel in self.redis_sentinels:
            args += ["--redis-sentinel", sentinel]
        if self.redis_service:
            args += ["--redis-service", self.redis_service]
        if self.start_redis:
            args += ["--start-redis"]
        if self.stream_ttl_s != 3600:
            args += ["--stream-ttl", str(self.stream_ttl_s)]
        return args

    def streams_to_redis(self) -> bool:
        return bool(self.redis_sentinels) or self.start_redis or self.stream_cache.startswith(_REDIS_SCHEMES)


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_stream_cache(config: ServerConfig) -> None:
    """InputError naming the fix for a stream-cache option that cannot work."""
    given = config.stream_cache
    if given not in ("memory", "none") and not given.startswith(_REDIS_SCHEMES):
        raise InputError(f"--stream-cache {given!r}: give memory (default), none, or redis://HOST:PORT/DB")
    if config.redis_sentinels:
        if not config.redis_service:
            raise InputError(
                "--redis-sentinel needs --redis-service NAME (the primary the Sentinels monitor)"
            )
        if given.startswith(_REDIS_SCHEMES) or config.start_redis:
            raise InputError(
                "give either --redis-sentinel or a redis:// --stream-cache / --start-redis, not both"
            )
        for sentinel in config.redis_sentinels:
            host, _, port = sentinel.rpartition(":")
            if not host or not port.isdigit():
                raise InputError(f"--redis-sentinel {sentinel!r}: give HOST:PORT (e.g. sentinel1:26379)")
    elif config.redis_service:
        raise InputError("--redis-service names the primary of --redis-sentinel; give the Sentinels too")
    if config.start_redis and given.startswith(_REDIS_SCHEMES):
        raise InputError("--start-redis starts its own Redis: leave out --stream-cache redis://...")
    if config.stream_ttl_s < 1:
        raise InputError(f"--stream-ttl {config.stream_ttl_s}: give a positive number of seconds")


def stream_cache_config(config: ServerConfig, namespace: str) -> dict[str, Any] | None:
    """The ``cache_config`` of one run catalog (tiled's streaming cache), or None without streaming.

    ``namespace`` keeps the catalog's keys apart from the other catalogs' in a shared Redis.
    """
    if config.stream_cache == "none" and not config.redis_sentinels:
        return None
    if not config.streams_to_redis():
        # tiled's in-memory store (TTLCacheDatastore); maxsize counts writes over all nodes.
        return {"uri": "memory", "data_ttl": config.stream_ttl_s, "seq_ttl": 30 * 86400, "maxsize": 100_000}
    from .adapters._streaming import DATASTORE_NAME

    redis: dict[str, Any] = (
        {"redis_sentinels": list(config.redis_sentinels), "service_name": config.redis_service}
        if config.redis_sentinels
        else {"redis_uri": config.stream_cache}
    )
    return {
        "datastore": DATASTORE_NAME,
        **redis,
        "namespace": namespace,
        # tiled's defaults (StreamingCacheConfig); its Redis store reads every one of these.
        "data_ttl": config.stream_ttl_s,
        "seq_ttl": 30 * 86400,
        "socket_timeout": 86400,
        "socket_connect_timeout": 10,
        "health_check_interval": 10,
    }


def server_config(config: ServerConfig) -> dict[str, Any]:
    """The tiled server configuration (a dict ready for YAML) for ``config``."""
    storage = config.data_dir / "data"
    tables = config.tables_uri or f"sqlite:///{storage / 'tables.sqlite'}"
    readable = config.readable_directories()
    # tiled's catalog, whose adapters resolve every asset and refuse it outside the storage.
    catalog = "nanobeam_bluesky.tiled.adapters:contained_catalog"
    instrument_dir = str(config.instruments) if config.instruments else None
    # The server's own instrument is named inside its directory: adapters never take paths.
    instrument = (
        {"instrument": config.instrument.name, "instrument_dir": str(config.instrument.parent)}
        if config.instrument
        else {"instrument": None}
    )

    def run_catalog(path: str, database: str) -> dict[str, Any]:
        # Raw and derived runs: the same storage (derived arrays are small), each its own database.
        # Both publish their writes to the stream cache (namespaced by database: node ids repeat).
        namespace = f"nanobeam:{path}:{hashlib.sha256(database.encode()).hexdigest()[:12]}"
        return {
            "path": f"/{path}",
            "tree": catalog,
            "args": {
                "cache_config": stream_cache_config(config, namespace),
                "uri": database,
                "writable_storage": [storage.as_uri(), tables],
                "readable_storage": readable,
                # `tiled catalog init` runs once (ensure_catalog); checking on every start costs ~10 s.
                "init_if_not_exists": False,
                "specs": [{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
                "adapters_by_mimetype": dict(ADAPTERS_BY_MIMETYPE),
                "instrument_dir": instrument_dir,
            },
        }

    trees: list[dict[str, Any]] = [
        run_catalog(RUNS_PATH, config.catalog_database()),
        run_catalog(DERIVED_PATH, config.derived_database()),
        {
            "path": "/files",
            "tree": catalog,
            "args": {
                "uri": config.files_database(),
                "readable_storage": readable,
                "init_if_not_exists": False,
                "adapters_by_mimetype": dict(ADAPTERS_BY_MIMETYPE),
                "instrument_dir": instrument_dir,
            },
        },
    ]
    if config.library:
        trees.append(
            {
                "path": "/library",
                "tree": "nanobeam_bluesky.tiled.adapters:SimulatedLibraryAdapter.from_path",
                "args": {"path": str(config.library)},
            }
        )
    if config.lazy_library:
        trees.append(
            {
                "path": "/simulated",
                "tree": "nanobeam_bluesky.tiled.adapters:LazyLibraryAdapter.from_instrument",
                "args": {**instrument, "grid_points": config.lazy_grid_points},
            }
        )
    if config.scans:
        trees.append(
            {
                "path": "/scans",
                "tree": "nanobeam_bluesky.tiled.adapters:ScanDirectoryAdapter.from_directory",
                "args": {
                    "directory": str(config.scans),
                    "layout": dict(config.scan_layout),
                    "roi_center_px": list(config.roi_center_px) if config.roi_center_px else None,
                    "roi": config.roi,
                    "binning": config.binning,
                    **instrument,
                },
            }
        )
    return {
        "authentication": {
            "single_user_api_key": f"${{{API_KEY_ENV}}}",
            "allow_anonymous_access": False,
        },
        "trees": trees,
        # `run.documents()` needs this exporter; the validator lets `run.validate()` fix shapes.
        "media_types": {
            "BlueskyRun": {"application/json-seq": "bluesky_tiled_plugins.exporters:json_seq_exporter"}
        },
        # ... and the live-maps page (nanobeam_bluesky.tiled.web, at /custom/live/).
        "routers": ["bluesky_tiled_plugins.routers.validator:router", "nanobeam_bluesky.tiled.web:router"],
        "expose_raw_assets": False,
        "uvicorn": {"host": config.host, "port": config.port},
    }


_HEADER = """\
# Tiled server config written by `nanobeam serve`; edit the command's options rather than this
# file (it is rewritten at every start). To serve it with tiled itself:
#     {env}=<key> tiled serve config {path}
# The API key is read from ${env}; `nanobeam serve` keeps it in {key_file} (mode 0600).
"""


def write_server_config(config: ServerConfig) -> Path:
    """Write the tiled config into the data directory; returns its path."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    (config.data_dir / "data").mkdir(exist_ok=True)
    text = _HEADER.format(env=API_KEY_ENV, path=config.config_path, key_file=config.data_dir / "api_key")
    text += yaml.safe_dump(server_config(config), sort_keys=False)
    partial = config.config_path.with_suffix(".yml.partial")
    partial.write_text(text)
    partial.replace(config.config_path)
    return config.config_path


def resolve_api_key(data_dir: Path, given: str | None = None) -> str:
    """The API key: given, else ``$NANOBEAM_TILED_API_KEY``, else kept in ``data_dir/api_key``.

    A new key is random (256 bits) and written with mode 0600, so restarts keep it.
    """
    key = given or os.environ.get(API_KEY_ENV)
    key_file = Path(data_dir) / "api_key"
    if not key and key_file.is_file():
        key = key_file.read_text().strip()
    if not key:
        key = secrets.token_hex(32)
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
    if not key.isalnum():
        raise InputError("the API key may contain only letters and digits (tiled's rule)")
    return key


def check_api_key(key: str) -> str:
    """Refuse an API key too short to serve with (< ``MIN_API_KEY_LENGTH`` characters).

    Kept apart from :func:`resolve_api_key`, which clients also use to find a key.
    """
    if len(key) < MIN_API_KEY_LENGTH:
        raise InputError(
            f"the API key is too short ({len(key)} characters, the server needs at least "
            f"{MIN_API_KEY_LENGTH}): give a longer --api-key / ${API_KEY_ENV} (e.g. `openssl rand -hex 32`) "
            "or unset both to use the generated key"
        )
    return key


def ensure_catalog(uri: str) -> bool:
    """Initialise a catalog database once (``tiled catalog init``); True if it was new.

    An SQLite file that exists is taken as initialised (no start-up cost); other databases are
    checked (``--if-not-exists``). Runs in-process (0.5 s) when tiled's command is importable,
    else as ``python -m tiled catalog init``.
    """
    if uri.startswith("sqlite"):
        path = Path(uri.split(":///", 1)[1])
        if path.is_file() and path.stat().st_size > 0:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from tiled.commandline._catalog import init as tiled_catalog_init
    except ImportError:
        tiled_catalog_init = None
    if tiled_catalog_init is not None:
        try:
            with contextlib.redirect_stderr(io.StringIO()) as messages:
                tiled_catalog_init(database=uri, if_not_exists=True)
        except (Exception, SystemExit) as exc:
            raise RuntimeError(
                f"`tiled catalog init` failed for {uri}: {exc} {messages.getvalue().strip()}"
            ) from exc
        return True
    cmd = [sys.executable, "-m", "tiled", "catalog", "init", "--if-not-exists", uri]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"`tiled catalog init` failed for {uri}: {result.stderr.strip()}")
    return True


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(config: ServerConfig, api_key: str | None = None, *, log_level: str = "warning") -> None:
    """Write the config, initialise the catalog if new, and serve until interrupted (with its
    own ``redis-server`` for the stream cache if ``config.start_redis``)."""
    _check_port_free(config.host, config.port)
    key = check_api_key(resolve_api_key(config.data_dir, api_key))
    _log_refusals()
    with contextlib.ExitStack() as stack:
        if config.start_redis:
            # Our own Redis for the stream cache, stopped with the server (and dies with it).
            from ._redis import RedisServer

            redis = stack.enter_context(RedisServer(config.data_dir / "redis", port=free_port()))
            config = dataclasses.replace(config, stream_cache=redis.uri, start_redis=False)
        _serve(config, key, log_level)


def _serve(config: ServerConfig, key: str, log_level: str) -> None:
    import uvicorn
    from tiled.config import parse_configs
    from tiled.server.app import build_app_from_config

    write_server_config(config)
    ensure_catalog(os.path.expandvars(config.catalog_database()))
    ensure_catalog(os.path.expandvars(config.derived_database()))
    ensure_catalog(os.path.expandvars(config.files_database()))
    os.environ[API_KEY_ENV] = key
    parsed = parse_configs(config.config_path)
    app = build_app_from_config(parsed)
    if not _is_loopback(config.host):
        print(
            f"WARNING: listening on {config.host}, not loopback: anyone who can reach this machine "
            "and holds the API key can read and write. Put it behind TLS for a facility.",
            file=sys.stderr,
        )
    banner = _banner(config)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # bound and the app started: it answers now
                print(banner, file=sys.stderr, flush=True)

    _Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level)).run()


def _banner(config: ServerConfig) -> str:
    """What ``nanobeam serve`` prints once it answers: where, what, and where the key is."""
    served = [
        "/runs (writable run catalog)",
        "/derived (derived runs)",
        "/files (catalog for `tiled register`)",
    ]
    served += ["/library"] if config.library else []
    served += ["/simulated (library simulated on demand)"] if config.lazy_library else []
    served += [f"/scans ({config.scans})"] if config.scans else []
    streams = config.stream_cache != "none" or bool(config.redis_sentinels)
    live = f"  live maps: {config.live_url}#key=<API key> (in a browser)\n" if streams else ""
    return (
        f"nanobeam Tiled server at {config.url}\n"
        f"  serving: {', '.join(served)}\n"
        f"  runs catalog: {config.runs_url}\n"
        f"  derived runs: {config.derived_url}\n"
        f"  live stream: {_stream_description(config)}\n"
        f"{live}"
        f"  API key: in {config.data_dir / 'api_key'} or ${API_KEY_ENV} "
        f"(from tiled.client import from_uri; from_uri(URL, api_key=KEY))\n"
        f"  config: {config.config_path}"
    )


def _stream_description(config: ServerConfig) -> str:
    if config.redis_sentinels:
        return f"Redis via Sentinels {', '.join(config.redis_sentinels)} ({config.redis_service})"
    if config.stream_cache == "none":
        return "off (--stream-cache none)"
    if config.stream_cache == "memory":
        return "in this process (subscribe: node.subscribe(); nanobeam watch URL)"
    return f"Redis at {_without_password(config.stream_cache)}"


def _without_password(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def _log_refusals() -> None:
    """Send the package's warnings (refused requests, model-file notes) to the server's stderr."""
    logger = logging.getLogger("nanobeam_bluesky")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)


def _check_port_free(host: str, port: int) -> None:
    """InputError naming the fix when ``port`` on ``host`` is taken (before the banner, the
    catalog and the server start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(
                f"port {port} on {host} is in use ({exc.strerror}): stop what serves there (another "
                "nanobeam serve?) or choose another port with --port"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TiledServer:
    """``nanobeam serve`` in a child process: started, waited for, and always stopped.

    >>> with TiledServer(ServerConfig(data_dir="tiled-data", port=free_port())) as server:
    ...     runs = server.client("runs")
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.api_key = check_api_key(resolve_api_key(config.data_dir, api_key))
        self._env = {**os.environ, **(env or {}), API_KEY_ENV: self.api_key}
        self._extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = config.data_dir / "server.log"

    @property
    def url(self) -> str:
        return self.config.url

    def start(self, timeout: float = 180.0) -> TiledServer:
        """Start the server and wait until it answers ``/healthz`` (or fail with its log)."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "nanobeam_bluesky.cli",
            "serve",
            *self.config.to_args(),
            *self._extra_args,
        ]
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Tiled server exited at start-up:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the Tiled server did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, path: str = "", **kwargs: Any) -> Any:
        """A tiled client for ``path`` (e.g. "runs", "library", "scans") with the API key."""
        from tiled.client import from_uri

        url = f"{self.url}/api/v1/metadata/{path.strip('/')}" if path else self.url
        return from_uri(url, api_key=self.api_key, **kwargs)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server: SIGINT (clean shutdown), then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> TiledServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
