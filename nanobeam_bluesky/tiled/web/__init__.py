"""The live-maps page of ``nanobeam serve``: derived runs and their ε/ω/χ maps, in a browser.

A router that tiled includes from the server config (``routers:``), so the page is served by the
same server, on the same origin as the API: at ``/custom/live/`` (tiled also mounts custom routers
under ``/api/v1``). The page and its script are static files of this package (no data, no key);
in the browser they read the API with the key the user gives (URL fragment ``#key=...`` or the
login field, kept in the tab's sessionStorage):

- ``GET /api/v1/search/derived`` once for the run list, then the ``/derived`` container's stream
  (``/api/v1/stream/single/derived``: ``container-child-created`` for a new run,
  ``container-child-metadata-updated`` when its stop document lands);
- the selected run's start (grid: ``shape``/``extents``/``hints.dimensions``) and the data keys
  (units), then the stream of its event table ``primary/internal`` with ``start=1``: every
  ``table-data`` append from the first write, then live; JSON envelopes, columns as lists.

WebSockets from a browser cannot carry an ``Authorization`` header; the page sends tiled's
first-message authentication ``{"type": "auth", "api_key": ...}`` instead.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.requests import Request

from ..._schema import FLAG_BITS, NO_VALUE, PARAMETERS, RESULT_UNITS

__all__ = ["LIVE_PATH", "page_schema", "router"]

#: Where the page is served, below tiled's prefix for custom routers (``/custom``).
LIVE_PATH = "/live"
#: The page's files and their media types: only these are served (no path from the request
#: reaches the file system).
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Revalidate every time: a new package version must not be hidden behind a cached script.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter()


def page_schema() -> dict[str, Any]:
    """What the page needs to know about the derived stream: parameters, units, flag bits."""
    return {
        "parameters": list(PARAMETERS),
        "units": dict(RESULT_UNITS),
        "flag_bits": {name: int(bit) for name, bit in FLAG_BITS.items()},
        "no_value": int(NO_VALUE),
    }


def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath("static", name).read_bytes()


@router.get(LIVE_PATH, include_in_schema=False)
async def live_redirect(request: Request) -> RedirectResponse:
    # The page's files are relative to the directory: /custom/live -> /custom/live/
    return RedirectResponse(request.url.path + "/", status_code=307)


@router.get(LIVE_PATH + "/", include_in_schema=False)
async def live_page() -> HTMLResponse:
    return HTMLResponse(_read("index.html"), headers=_HEADERS)


@router.get(LIVE_PATH + "/schema.json", include_in_schema=False)
async def live_schema() -> JSONResponse:
    return JSONResponse(page_schema(), headers=_HEADERS)


@router.get(LIVE_PATH + "/{name}", include_in_schema=False)
async def live_file(name: str) -> Response:
    if name not in _FILES:
        raise HTTPException(status_code=404, detail=f"no file {name!r} in the live page")
    return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)
