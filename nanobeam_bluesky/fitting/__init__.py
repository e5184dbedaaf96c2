"""Fitting (strain, omega, chi) against a simulated grid library, frame by frame.

* :class:`CorrelationFitter` (``method="faithful"``): the published correlation fit with its
  interpolated centre of mass, exactly as docs/physics.md describes it.
* :class:`LikelihoodFitter` (``method="ours"``): our improvement, a multinomial likelihood with a
  quadratic (Laplace) refinement between grid points and a standard deviation per parameter.

Both compare frames with the library as a chunked matrix product, so memory is bounded by the chunk
size, not by the map size, and return an ``xarray.Dataset`` shaped like the predictor's.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..physics import PARAMETERS
from .base import GridFitter, available_memory_bytes, default_memory_budget
from .correlation import CorrelationFitter
from .library import Library, LibraryMismatchError
from .likelihood import LikelihoodFitter

__all__ = [
    "FITTERS",
    "PARAMETERS",
    "CorrelationFitter",
    "GridFitter",
    "Library",
    "LibraryMismatchError",
    "LikelihoodFitter",
    "available_memory_bytes",
    "default_memory_budget",
    "make_fitter",
]

#: Fit methods by name: the published one and ours.
FITTERS: dict[str, type[GridFitter]] = {"faithful": CorrelationFitter, "ours": LikelihoodFitter}


def make_fitter(method: str, library: Library, **kwargs: Any) -> GridFitter:
    """A fitter by method name (``"faithful"`` or ``"ours"``) for ``library``."""
    try:
        cls = FITTERS[method]
    except KeyError:
        raise InputError(f"unknown fit method {method!r}; choose one of {sorted(FITTERS)}") from None
    return cls(library, **kwargs)
