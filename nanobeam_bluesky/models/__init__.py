"""Network architectures and the model-file format.

* ``paper``: the published NanobeamNN CNN (27,771 parameters), fed raw counts.
* ``mlp``: ours, a count-normalised dense network that is faster and more accurate on a CPU.
* ``registered_mlp``: ours, the refining stage: the same network on frames shifted by whole pixels
  to a coarse tilt estimate; it predicts the tilts' sub-pixel residual (and, given a copy of the
  frame shifted to the coarse band position, the band's, hence strain).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InputError
from .card import Architecture, ModelCard, ModelCardError, RefinerCard
from .mlp import NanobeamMLP, normalise_counts
from .modelfile import (
    ModelFileError,
    as_stored,
    load_model_file,
    model_sha256,
    save_model_file,
    weights_sha256,
)
from .paper import PaperCNN
from .registered import RegisteredMLP, TiltRegistration, register_frames

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ModelCard",
    "ModelCardError",
    "ModelFileError",
    "NanobeamMLP",
    "PaperCNN",
    "RefinerCard",
    "RegisteredMLP",
    "TiltRegistration",
    "as_stored",
    "build_model",
    "count_parameters",
    "load_model_file",
    "model_sha256",
    "normalise_counts",
    "register_frames",
    "save_model_file",
    "weights_sha256",
]

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "paper": PaperCNN,
    "mlp": NanobeamMLP,
    "registered_mlp": RegisteredMLP,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """An untrained network by architecture name (see ``ARCHITECTURES``)."""
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise InputError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
