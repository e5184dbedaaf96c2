"""The one place where errors raised inside the adapters become HTTP errors.

tiled has no hook for that: its server config (``tiled serve config``, which the config written
by ``nanobeam serve`` also supports) cannot register exception handlers, and
``tiled.server.app.build_app`` handles only tiled's own exceptions (``Conflicts``,
``UnsupportedQueryType``, ...). Anything else an adapter raises while serving a request becomes an
opaque "500 Internal server error", which the tiled client retries. So every adapter boundary
(building a node from the catalog, opening an entry of a scan directory, reading an array) runs
inside :func:`served_errors`, and :data:`STATUS_BY_ERROR` is the one mapping of our errors (and
the builtin ones reading a file raises) to HTTP statuses; each is a 4xx, so the tiled client shows
the message at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ._errors import DataError, RefusedError

if TYPE_CHECKING:
    from fastapi import HTTPException

__all__ = ["DATA_ERROR_STATUS", "REFUSED_STATUS", "STATUS_BY_ERROR", "http_error", "served_errors"]

#: Data the server cannot read (corrupt, truncated, wrong layout, too large a request).
DATA_ERROR_STATUS = 422
#: Data the server refuses to serve (outside its declared files).
REFUSED_STATUS = 403

#: HTTP status by error class; the first class that matches wins. Errors of other classes are
#: bugs and stay 500s.
STATUS_BY_ERROR: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    (RefusedError, REFUSED_STATUS),
    (DataError, DATA_ERROR_STATUS),
    # ScanFileError, LibraryError, InstrumentError and what h5py / numpy raise on a bad file
    ((ValueError, OSError, KeyError, RuntimeError), DATA_ERROR_STATUS),
)


def http_error(exc: Exception, what: str = "") -> HTTPException | None:
    """The HTTP error that answers ``exc`` (its message, prefixed by ``what``), else None."""
    from fastapi import HTTPException

    if isinstance(exc, HTTPException):
        return exc
    for errors, status in STATUS_BY_ERROR:
        if isinstance(exc, errors):
            detail = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            prefix = f"{what}: " if what and what not in detail else ""
            return HTTPException(status_code=status, detail=prefix + detail)
    return None


@contextlib.contextmanager
def served_errors(what: str = "") -> Iterator[None]:
    """Raise the errors of the block as HTTP errors (:func:`http_error`) whose message reaches the
    tiled client; ``what`` names the node (a file, "library frames") when the message does not."""
    try:
        yield
    except Exception as exc:
        error = http_error(exc, what)
        if error is None or error is exc:
            raise
        raise error from exc
