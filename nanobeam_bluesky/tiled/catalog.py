"""The run catalog from the user's side: open it, write runs into it, and the queries people type.

Raw and derived runs are written by bluesky-tiled-plugins' own ``TiledWriter``; this module only
chooses its batching. ``nanobeam serve`` keeps the derived runs in their own catalog, ``/derived``,
beside ``/runs``, so that ``runs[-1]`` and ``runs[scan_id]`` keep meaning the scan;
:func:`derived_catalog` finds it (or, on a server with one catalog, uses that one). The metadata
keys the queries use are the contract with the live callback (derived runs) and with the
beamline's ``RE.md`` (raw runs):

=================  =============================  ==============================================
query              start-document key             example
=================  =============================  ==============================================
sample name        ``sample``                     ``RE.md["sample"] = "SrIrO3/LSAT #3"``
scan type          ``plan_name``                  ``"grid_scan"``, ``"fly_scan"`` (set by plans)
date               ``time``                       ``TimeRange(since="2025-03-01")``
raw or derived     ``analysis_stage``             ``"raw"`` (``mark_raw_runs(RE)``), ``"nanobeam_nn"``
derived runs       ``parent_uid``                 uid of the raw run a derived run analyses
analysing model    ``nanobeam.model_sha256``      sha256 of the model file (weights and metadata)
=================  =============================  ==============================================
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import InputError

#: Environment variable holding the API key; the server config refers to it instead of storing it.
API_KEY_ENV = "NANOBEAM_TILED_API_KEY"

__all__ = [
    "ANALYSIS_STAGE_KEY",
    "API_KEY_ENV",
    "DERIVED_CATALOG",
    "MODEL_SHA256_KEY",
    "PARENT_UID_KEY",
    "SAMPLE_KEY",
    "SCAN_TYPE_KEY",
    "api_key_or_environment",
    "connect",
    "derived_catalog",
    "derived_runs",
    "open_catalog",
    "runs_analysed_by",
    "runs_between",
    "runs_by_sample",
    "runs_by_scan_type",
    "tiled_writer",
    "writer_batch_size",
]

logger = logging.getLogger(__name__)

SAMPLE_KEY = "sample"
ANALYSIS_STAGE_KEY = "analysis_stage"
#: The name of the derived-run catalog beside the run catalog (``nanobeam serve``'s /derived).
DERIVED_CATALOG = "derived"
SCAN_TYPE_KEY = "plan_name"
PARENT_UID_KEY = "parent_uid"
MODEL_SHA256_KEY = "nanobeam.model_sha256"


def api_key_or_environment(api_key: str | None) -> str | None:
    """The API key given, else ``$TILED_API_KEY`` (tiled's own), else ``$NANOBEAM_TILED_API_KEY``."""
    import os

    return api_key or os.environ.get("TILED_API_KEY") or os.environ.get(API_KEY_ENV)


def connect(uri: str, *, api_key: str | None = None, **kwargs: Any) -> Any:
    """``tiled.client.from_uri``, with what commonly goes wrong said in one line naming the fix:
    no server there, no API key, a wrong one."""
    from tiled.client import from_uri

    _check_reachable(uri)
    try:
        return from_uri(uri, api_key=api_key, **kwargs)
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        text = str(exc)
        key_fix = f"give it with --api-key or ${API_KEY_ENV} (nanobeam serve keeps it in DATA_DIR/api_key)"
        if status == 401 or "Invalid API key" in text:
            raise InputError(f"the Tiled server at {uri} refused the API key (401); {key_fix}") from None
        if "requires API key" in text:
            raise InputError(f"the Tiled server at {uri} needs an API key; {key_fix}") from None
        if type(exc).__name__ in ("ConnectError", "ConnectTimeout") or isinstance(exc, ConnectionError):
            raise InputError(
                f"no Tiled server answers at {uri} ({exc}); start it (nanobeam serve) or check the host "
                "and port"
            ) from None
        if status == 404:
            raise InputError(f"{uri}: no such node on the Tiled server (404); check the path") from None
        raise


def _check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail at once when nothing listens at the URI's host and port (tiled's client would retry
    a refused connection for some 20 s before saying so)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if not parts.hostname:
        raise InputError(f"{uri!r} is not a URL; give http://HOST:PORT/...")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(
            f"no Tiled server answers at {uri} ({exc.strerror or exc}); start it (nanobeam serve) or "
            "check the host and port"
        ) from None


def open_catalog(catalog: Any, *, api_key: str | None = None, **kwargs: Any) -> Any:
    """The run catalog from a tiled URI, a tiled/databroker profile name, or a client.

    ``catalog`` may be the server (``http://127.0.0.1:8000``; its ``runs`` node is used), the
    catalog itself (``http://127.0.0.1:8000/api/v1/metadata/runs``), a profile name as beamlines
    name their catalogs (``tiled profile list``; databroker 2 reads the same profiles), or an
    already opened tiled client. The API key may also come from ``$TILED_API_KEY``.
    """
    from tiled.client import from_profile

    if not isinstance(catalog, str):
        client = catalog
    else:
        key = api_key_or_environment(api_key)
        if "://" in catalog:
            client = connect(catalog, api_key=key, **kwargs)
        else:
            try:
                client = from_profile(catalog, **({"api_key": key} if key else {}), **kwargs)
            except Exception as exc:
                raise InputError(
                    f"{catalog!r} is neither a tiled URI (http://...) nor a known tiled/databroker "
                    f"profile ({exc}); list profiles with `tiled profile list`"
                ) from exc
    specs = {spec.name for spec in getattr(client, "specs", [])}
    if "CatalogOfBlueskyRuns" not in specs and "runs" in client:
        client = client["runs"]
    return client


def _start_key(key: str) -> str:
    return key if key.startswith(("start.", "stop.")) else f"start.{key}"


def _search_eq(catalog: Any, key: str, value: Any) -> Any:
    from tiled.queries import Key

    return catalog.search(Key(_start_key(key)) == value)


def runs_by_sample(catalog: Any, sample: str) -> Any:
    """Runs whose start document has ``sample == sample``."""
    return _search_eq(catalog, SAMPLE_KEY, sample)


def runs_by_scan_type(catalog: Any, plan_name: str) -> Any:
    """Runs of one plan (``grid_scan``, ``fly_scan``, ...)."""
    return _search_eq(catalog, SCAN_TYPE_KEY, plan_name)


def runs_between(catalog: Any, since: Any = None, until: Any = None, *, timezone: str | None = None) -> Any:
    """Runs started in [since, until): dates as timestamps, datetimes or "2025-03-01 14:00"."""
    from bluesky_tiled_plugins.queries import TimeRange

    if since is None and until is None:
        return catalog
    return catalog.search(TimeRange(since=since, until=until, timezone=timezone))


#: Catalogs already warned about having no derived catalog beside them (their URIs).
_WARNED_SINGLE: set[str] = set()


def derived_catalog(catalog: Any, *, api_key: str | None = None) -> Any:
    """The catalog that holds the derived runs of the run catalog ``catalog``.

    ``catalog`` is what :func:`open_catalog` takes (a URI, a profile name, a client). On
    ``nanobeam serve`` this is the ``/derived`` catalog beside ``/runs``; given the derived
    catalog itself, that. A server without one (a beamline's own Tiled with a single catalog)
    keeps derived runs with the raw ones: the catalog itself is returned, with a warning logged
    once, and ``Key("start.analysis_stage") == "raw"`` picks the raw runs there.
    """
    runs = open_catalog(catalog, api_key=api_key)
    path = list(getattr(runs, "path_parts", []) or [])
    if path[-1:] == [DERIVED_CATALOG]:
        return runs
    parent = None
    if path:  # the root of a server is no run catalog with siblings
        try:
            parent = runs.parent
            sibling = parent[DERIVED_CATALOG] if DERIVED_CATALOG in parent else None
        except Exception:  # no permission to list the parent, an old server: one catalog
            sibling = None
        if sibling is not None:
            return sibling
    uri = str(getattr(runs, "uri", catalog))
    if uri not in _WARNED_SINGLE:
        _WARNED_SINGLE.add(uri)
        logger.warning(
            "%s has no %r catalog beside it: derived runs are kept with the raw runs there "
            "(runs[-1] may then be an analysis; pick raw runs with Key('start.%s') == 'raw')",
            uri,
            DERIVED_CATALOG,
            ANALYSIS_STAGE_KEY,
        )
    return runs


def derived_runs(catalog: Any, parent_uid: str) -> Any:
    """Derived (ε, ω, χ) runs that analyse the raw run ``parent_uid``; ``catalog`` is the run
    catalog or the derived one (see :func:`derived_catalog`)."""
    return _search_eq(derived_catalog(catalog), PARENT_UID_KEY, parent_uid)


def runs_analysed_by(catalog: Any, sha256: str) -> Any:
    """Derived runs made by the model file with this sha256 (weights and metadata since model
    format 4; weights only before); ``catalog`` as for :func:`derived_runs`."""
    return _search_eq(derived_catalog(catalog), MODEL_SHA256_KEY, sha256)


def writer_batch_size(
    points_per_row: int | None = None,
    *,
    frame_rate_hz: float | None = None,
    latency_s: float = 2.0,
    min_interval_s: float = 0.5,
) -> int:
    """Events per TiledWriter write: results show within ``latency_s`` yet the writer keeps pace.

    ``TiledWriter(batch_size=1)`` makes two HTTP writes per event (about 7 events/s here), which
    cannot keep pace with a detector; its default (10,000) shows nothing until the run ends. One
    write costs ~0.1-0.3 s, so writes should come at most every ``min_interval_s``. A step scan is
    written a row at a time (``points_per_row``), kept between ``frame_rate_hz * min_interval_s``
    and ``frame_rate_hz * latency_s`` when the rate is known; with nothing known, 50 events.
    """
    if frame_rate_hz:
        low = frame_rate_hz * min_interval_s
        high = frame_rate_hz * latency_s
        size = high if not points_per_row else min(max(points_per_row, low), high)
    else:
        size = points_per_row or 50
    return max(1, int(size))


def tiled_writer(
    catalog: Any, *, batch_size: int | None = None, api_key: str | None = None, **kwargs: Any
) -> Any:
    """bluesky-tiled-plugins' ``TiledWriter`` on ``catalog``, batched by :func:`writer_batch_size`.

    ``max_array_size=0`` stores every array as an array (tiled otherwise stores arrays of <= 16
    elements as strings in the event table). Subscribe it to the RunEngine (``RE.subscribe``)
    and to the live callback's derived documents.
    """
    from bluesky_tiled_plugins import TiledWriter

    kwargs.setdefault("max_array_size", 0)
    client = open_catalog(catalog, api_key=api_key)
    return TiledWriter(client, batch_size=batch_size or writer_batch_size(), **kwargs)
