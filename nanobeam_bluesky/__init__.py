"""nanobeam_bluesky: live strain and tilt maps from scanning X-ray nanodiffraction.

The main entry points: :func:`load_pretrained` (the shipped two-stage NanobeamNN model),
:class:`Predictor`, :mod:`nanobeam_bluesky.physics` (the forward model),
:mod:`nanobeam_bluesky.callbacks` (live analysis in Bluesky) and the ``nanobeam`` command line.

The names below are imported on first use (PEP 562), so ``import nanobeam_bluesky.cli`` and
``nanobeam --help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import InputError, NanobeamError

if TYPE_CHECKING:
    from .callbacks import mark_raw_runs
    from .inference import InstrumentMismatchError, Predictor, load_pretrained
    from .physics import Instrument
    from .quality import Flag

__all__ = [
    "Flag",
    "InputError",
    "Instrument",
    "InstrumentMismatchError",
    "NanobeamError",
    "Predictor",
    "__version__",
    "load_pretrained",
    "mark_raw_runs",
]

_LAZY = {
    "Flag": ".quality",
    "Instrument": ".physics",
    "InstrumentMismatchError": ".inference",
    "Predictor": ".inference",
    "load_pretrained": ".inference",
    "mark_raw_runs": ".callbacks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
