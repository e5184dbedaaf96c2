"""Model files: the members' ``state_dict`` plus JSON metadata, loaded with ``weights_only=True``.

A file is a dict ``{"format", "format_version", "metadata" (JSON text), "members" (list of
state_dicts)}``. The metadata names the architecture, instrument, parameter ranges, input and
output normalisation, count level, training recipe, metrics, package version and a sha256, so a
file is self-describing and checkable. Since format version 4 the sha256 covers the weights and
the metadata (its canonical JSON without the sha256 itself): an edited normalisation is caught
like an edited weight. Versions 1-3 recorded the weights' sha256 only; they still load (their
weights checked) with a logged note. The sha256 detects corruption and edits, it is no
signature: whoever edits a file can recompute it.

Large matrices may be stored as int8 with one float32 scale per row (key ``<name>.__row_scale``):
half the size of float16, and the shipped ensemble's RMSE changes by < 0.2 % (6,000 frames).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import NanobeamError

__all__ = [
    "ModelFileError",
    "as_stored",
    "load_model_file",
    "metadata_json",
    "model_sha256",
    "save_model_file",
    "weights_sha256",
]

logger = logging.getLogger(__name__)

FORMAT = "nanobeam-model"
#: 2: int8 rows; 3: an optional refining stage (metadata "refiner", its members listed last);
#: 4: the sha256 covers the metadata too. Older versions read the same way; older packages
#: refuse a newer version with "upgrade".
FORMAT_VERSION = 4
_READABLE_VERSIONS = (1, 2, 3, 4)
#: Versions whose sha256 covers the weights only.
_WEIGHTS_ONLY_VERSIONS = (1, 2, 3)
_ROW_SCALE = ".__row_scale"
#: Matrices with at least this many elements are stored as int8 rows when asked for: the MLP's
#: input layer (256 x 4096). Its 256 x 256 hidden layer is not: as int8 it cost 6 % on omega.
INT8_MIN_ELEMENTS = 262_144


class ModelFileError(NanobeamError, ValueError):
    """A model file that is missing, corrupt, tampered with or of another format."""


def _weights_digest(members: list[dict[str, torch.Tensor]]) -> Any:
    digest = hashlib.sha256()
    for state in members:
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest


def weights_sha256(members: list[dict[str, torch.Tensor]]) -> str:
    """sha256 over every member's tensors (names, dtypes, shapes and bytes), in a fixed order."""
    return _weights_digest(members).hexdigest()


def metadata_json(metadata: dict[str, Any]) -> str:
    """The canonical JSON of the metadata that the sha256 covers: without "sha256", keys sorted,
    no spaces, ASCII."""
    rest = {k: v for k, v in metadata.items() if k != "sha256"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def model_sha256(members: list[dict[str, torch.Tensor]], metadata: dict[str, Any]) -> str:
    """sha256 over the stored tensors (as :func:`weights_sha256`) then the metadata
    (:func:`metadata_json`): the model's identity since format version 4."""
    digest = _weights_digest(members)
    digest.update(b"\nmetadata:")
    digest.update(metadata_json(metadata).encode())
    return digest.hexdigest()


def _encode(
    state: dict[str, torch.Tensor], weight_dtype: torch.dtype, int8_rows: bool
) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if int8_rows and v.is_floating_point() and v.ndim == 2 and v.numel() >= INT8_MIN_ELEMENTS:
            scale = (v.float().abs().amax(1, keepdim=True) / 127).clamp(min=1e-30)
            out[k] = torch.round(v.float() / scale).clamp(-127, 127).to(torch.int8)
            out[k + _ROW_SCALE] = scale
        elif v.is_floating_point() and v.ndim >= 2:
            out[k] = v.to(weight_dtype).clone()
        elif v.is_floating_point():  # biases: a few KB, and they carry the int8 bias correction
            out[k] = v.float().clone()
        else:
            out[k] = v.clone()
    return out


def _decode(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(_ROW_SCALE):
            continue
        scale = state.get(k + _ROW_SCALE)
        if scale is not None:
            out[k] = v.float() * scale.float()
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def as_stored(
    members: list[dict[str, torch.Tensor]],
    *,
    weight_dtype: torch.dtype = torch.float32,
    int8_rows: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The float32 weights a file saved with these options gives back (to score them as shipped)."""
    return [_decode(_encode(state, weight_dtype, int8_rows)) for state in members]


def save_model_file(
    path: str | Path,
    members: list[dict[str, torch.Tensor]],
    metadata: dict[str, Any],
    *,
    weight_dtype: torch.dtype = torch.float32,
    int8_rows: bool = False,
) -> str:
    """Write a model file; returns its sha256 (weights and metadata; also stored in the metadata).

    ``weight_dtype=torch.float16`` halves the file (the shipped ensemble: its RMSE changes by
    < 0.1 %); ``int8_rows=True`` halves the large matrices again (int8, one float32 scale per
    row; RMSE change < 0.2 %). Biases stay float32 (a few KB). Weights are float32 again when
    loaded.
    """
    path = Path(path)
    members = [_encode(state, weight_dtype, int8_rows) for state in members]
    metadata = {k: v for k, v in metadata.items() if k != "sha256"}
    metadata |= {
        "n_members": len(members),
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
        "int8_rows": int8_rows,
    }
    metadata = json.loads(json.dumps(metadata))  # hash what loading gives back (lists, str keys)
    sha = model_sha256(members, metadata)
    metadata["sha256"] = sha
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata": json.dumps(metadata, sort_keys=True),
            "members": members,
        },
        partial,
    )
    partial.replace(path)
    return sha


def load_model_file(path: str | Path) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a model file safely (``weights_only=True``) and verify its sha256 (weights and
    metadata; weights only for format versions 1-3, with a logged note)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"no model file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        # torch's own message suggests weights_only=False, which we never do: keep it out.
        raise ModelFileError(
            f"{path} is not a loadable nanobeam model file ({type(exc).__name__}); it may be truncated, "
            "corrupt or not a model file. Train one with `nanobeam train` or use the shipped default."
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a nanobeam model file (format {FORMAT!r} expected)")
    if blob.get("format_version") not in _READABLE_VERSIONS:
        raise ModelFileError(
            f"{path} has model format version {blob.get('format_version')}, this package reads "
            f"{FORMAT_VERSION}; upgrade nanobeam_bluesky or retrain"
        )
    metadata = json.loads(blob["metadata"])
    members = blob["members"]
    version = blob["format_version"]
    if version in _WEIGHTS_ONLY_VERSIONS:
        if weights_sha256(members) != metadata.get("sha256"):
            raise ModelFileError(f"{path}: weights do not match their recorded sha256; the file is corrupt")
        logger.warning(
            "%s: model format version %s: its sha256 covers the weights only, not the metadata; "
            "re-save it with save_model_file (format %s) to cover both",
            path,
            version,
            FORMAT_VERSION,
        )
    elif model_sha256(members, metadata) != metadata.get("sha256"):
        raise ModelFileError(
            f"{path}: weights or metadata do not match the recorded sha256; the file is corrupt or "
            "was edited: retrain, or re-save it with save_model_file after a deliberate change"
        )
    return [_decode(m) for m in members], metadata
