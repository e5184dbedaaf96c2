"""Which data key of a raw stream holds the diffraction frames, and where its values live."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import NanobeamError

__all__ = [
    "FrameLayout",
    "ImageKeyError",
    "Storage",
    "find_frame_layout",
    "find_frame_time_key",
    "find_position_keys",
]


class ImageKeyError(NanobeamError, ValueError):
    """The raw stream has no usable frame key, or the named one has the wrong shape."""


class Storage(enum.Enum):
    """Where the values of a data key are found."""

    #: In the Event/EventPage itself (``bp.grid_scan`` with a classic ophyd detector).
    INLINE = "inline"
    #: In a file described by StreamResource/StreamDatum documents (ophyd-async fly scans).
    STREAM = "stream"
    #: In a file described by legacy Resource/Datum documents; events carry datum ids.
    DATUM = "datum"


@dataclass(frozen=True)
class FrameLayout:
    """How one raw stream delivers frames: the key, one frame's (rows, cols), and the storage."""

    image_key: str
    frame_shape: tuple[int, int]
    storage: Storage

    @staticmethod
    def storage_of(data_key: Mapping[str, Any]) -> Storage:
        external = data_key.get("external")
        if not external:
            return Storage.INLINE
        return Storage.STREAM if str(external).startswith("STREAM:") else Storage.DATUM


def _frame_shape(shape: Sequence[int | None]) -> tuple[int, int] | None:
    """(rows, cols) of one frame for shapes [H, W] or [1, H, W]; None for anything else."""
    dims = list(shape)
    if len(dims) == 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 2:
        return None
    rows, cols = dims
    if not isinstance(rows, int) or not isinstance(cols, int):
        return None
    return int(rows), int(cols)


def find_frame_layout(
    descriptor: Mapping[str, Any],
    frame_shapes: Sequence[tuple[int, int]],
    image_key: str | None = None,
) -> FrameLayout:
    """Find (or check) the frame key of a descriptor.

    Args:
        descriptor: the raw EventDescriptor.
        frame_shapes: the frame shapes the model accepts, e.g. ((64, 64), (128, 128)).
        image_key: the key to use; None looks for the one key of an accepted shape.

    Raises ImageKeyError, saying what was found and how to fix it.
    """
    data_keys: Mapping[str, Any] = descriptor["data_keys"]
    stream = descriptor.get("name", "?")
    accepted = " or ".join(f"{h} x {w}" for h, w in frame_shapes)
    arrays = {k: v.get("shape") for k, v in data_keys.items() if len(v.get("shape") or []) >= 2}
    if image_key is not None:
        if image_key not in data_keys:
            hint = f"array keys there: {arrays}" if arrays else "it has no array keys at all"
            raise ImageKeyError(
                f"image_key {image_key!r} is not a data key of stream {stream!r} ({hint}). Pass the "
                "detector's image key as NanobeamCallback(image_key=...), or image_key=None to find it."
            )
        shape = _frame_shape(data_keys[image_key].get("shape") or [])
        if shape is None or shape not in frame_shapes:
            raise ImageKeyError(
                f"data key {image_key!r} of stream {stream!r} has shape {data_keys[image_key].get('shape')}, "
                f"but the model takes frames of {accepted} pixels (optionally [1, H, W]). Give the detector "
                "a ROI of that size around the reflection (binned 64 x 64 or raw 128 x 128), or name "
                "another image_key."
            )
        return FrameLayout(image_key, shape, FrameLayout.storage_of(data_keys[image_key]))
    found = [k for k, v in data_keys.items() if _frame_shape(v.get("shape") or []) in frame_shapes]
    if not found:
        raise ImageKeyError(
            f"stream {stream!r} has no frame key of {accepted} pixels (array keys: {arrays or 'none'}). "
            "Set the detector ROI to the model's frame size, or pass image_key=... if the frames "
            "are there under another shape."
        )
    if len(found) > 1:
        raise ImageKeyError(
            f"stream {stream!r} has several frame-shaped keys {found}; pass image_key=... to choose one."
        )
    key = found[0]
    shape = _frame_shape(data_keys[key]["shape"])
    assert shape is not None
    return FrameLayout(key, shape, FrameLayout.storage_of(data_keys[key]))


def _is_scalar_number(data_key: Mapping[str, Any]) -> bool:
    shape = list(data_key.get("shape") or [])
    return data_key.get("dtype") in ("number", "integer") and shape in ([], [1])


def find_position_keys(
    start: Mapping[str, Any],
    descriptor: Mapping[str, Any],
    position_keys: Sequence[str] | None = None,
) -> list[str]:
    """The scalar keys that give the sample position of each frame.

    Explicit ``position_keys`` must all exist. Otherwise: the fields of the start document's
    ``hints.dimensions`` for this stream, then the readings of the devices listed in
    ``start['motors']``; only scalar numbers are kept.
    """
    data_keys: Mapping[str, Any] = descriptor["data_keys"]
    if position_keys is not None:
        missing = [k for k in position_keys if k not in data_keys]
        if missing:
            raise ImageKeyError(
                f"position key(s) {missing} are not in stream {descriptor.get('name', '?')!r} "
                f"(keys: {sorted(data_keys)}); pass position_keys=None to take the scan's motors."
            )
        return list(position_keys)
    stream = descriptor.get("name")
    candidates: list[str] = []
    for dim in (start.get("hints") or {}).get("dimensions") or []:
        try:
            fields, dim_stream = dim
        except (TypeError, ValueError):
            continue
        if dim_stream == stream:
            candidates.extend([fields] if isinstance(fields, str) else list(fields))
    object_keys = descriptor.get("object_keys") or {}
    for motor in start.get("motors") or []:
        candidates.extend(object_keys.get(motor, [motor]))
    keys: list[str] = []
    for key in candidates:
        if key in data_keys and key not in keys and _is_scalar_number(data_keys[key]):
            keys.append(key)
    return keys


#: Suffixes of a per-frame time key beside the frame key (``<image_key>-time``), as a fly
#: detector writes the start of each exposure (s since the epoch) next to its frames.
FRAME_TIME_SUFFIXES = ("-time", "-timestamp", "_time", "_timestamp")


def find_frame_time_key(
    descriptor: Mapping[str, Any], image_key: str, frame_time_key: str | None = None
) -> str | None:
    """The scalar key that says when each frame was taken (s since the epoch), if the stream has one.

    Fly scans announce frames with StreamDatum documents, which carry no time; a detector that
    writes each frame's time beside it (``<image_key>-time``, units "s") gives the derived rows
    the frames' own times, live and in replays alike. Without it, events' ``time`` is used (step
    scans), or the raw descriptor's time (a fly scan without frame times).
    """
    data_keys: Mapping[str, Any] = descriptor["data_keys"]
    if frame_time_key is not None:
        if frame_time_key not in data_keys or not _is_scalar_number(data_keys[frame_time_key]):
            raise ImageKeyError(
                f"frame_time_key {frame_time_key!r} is not a scalar number key of stream "
                f"{descriptor.get('name', '?')!r}; pass frame_time_key=None to find it or use event times."
            )
        return frame_time_key
    for suffix in FRAME_TIME_SUFFIXES:
        key = image_key + suffix
        if key in data_keys and _is_scalar_number(data_keys[key]) and data_keys[key].get("units") == "s":
            return key
    return None
