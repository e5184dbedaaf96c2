"""What the Tiled adapters raise about the data they serve (mapped to HTTP statuses in ``_http``)."""

from __future__ import annotations

from ..errors import InputError

__all__ = ["DataError", "RefusedError"]


class DataError(InputError):
    """A request that cannot be answered from the data (too large, unreadable); HTTP 422."""


class RefusedError(DataError):
    """A request for bytes outside the declared storage; HTTP 403."""
