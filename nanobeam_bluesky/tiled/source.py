"""A raw run in Tiled as a :class:`~nanobeam_bluesky.scans.ScanSource` (``nanobeam predict URI``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError
from ..formats import micrometres_per
from ..physics import Instrument
from ..scans import ScanPositionsTable, ScanSource, grid_of_positions
from .catalog import api_key_or_environment, connect

__all__ = ["is_tiled_uri", "open_tiled_run"]


def is_tiled_uri(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _frame_key(stream: Any, wanted: str | None, min_side: int) -> str:
    keys = list(stream)
    if wanted is not None:
        if wanted not in keys:
            raise InputError(
                f"the run's stream has no key {wanted!r} (it has {keys}); name the frames with --dataset"
            )
        return wanted
    frames = []
    for key in keys:
        try:
            shape = tuple(stream[key].shape)
        except Exception:  # a table or a node without a shape
            continue
        if len(shape) >= 3 and min(shape[-2:]) >= min_side:
            frames.append(key)
    if len(frames) != 1:
        what = f"several image keys {frames}" if frames else f"no image key among {keys}"
        raise InputError(f"the run's stream has {what}; name the frames with --dataset")
    return frames[0]


def _to_um(values: np.ndarray, data_key: Any, key: str) -> np.ndarray:
    """A position key's values in µm, by its units; a position without units is taken as µm."""
    units = (data_key or {}).get("units") if isinstance(data_key, Mapping) else None
    if not units:
        return values
    factor = micrometres_per(str(units))
    if factor is None:
        raise InputError(
            f"the scan's position {key!r} is in {units!r}, not a length; give the positions with "
            "--positions (CSV or MDA)"
        )
    return values * factor


def _position_keys(start: Mapping[str, Any], stream_name: str, keys: list[str]) -> list[str]:
    found: list[str] = []
    for dim in (start.get("hints") or {}).get("dimensions") or []:
        try:
            fields, dim_stream = dim
        except (TypeError, ValueError):
            continue
        if dim_stream == stream_name:
            found.extend([fields] if isinstance(fields, str) else list(fields))
    found = [k for k in found if k in keys]
    if len(found) < 2:
        found += [m for m in start.get("motors") or [] if m in keys and m not in found]
    return found[:2]


def open_tiled_run(
    uri: str,
    *,
    api_key: str | None = None,
    stream_name: str = "primary",
    frame_key: str | None = None,
    with_positions: bool = True,
) -> ScanSource:
    """The frames of a raw Bluesky run stored in Tiled, e.g.
    ``http://host:8000/api/v1/metadata/runs/<uid>``; positions from the scan's ``hints``
    (y, then x, converted to µm from their units; none: taken as µm) and the grid from its start
    document's ``shape``. ``with_positions=False`` skips them (positions given otherwise)."""
    run = connect(uri, api_key=api_key_or_environment(api_key))
    start = dict((run.metadata or {}).get("start") or {})
    if not start:
        raise InputError(f"{uri} is not a Bluesky run; point it at one, e.g. .../api/v1/metadata/runs/<uid>")
    if stream_name not in run:
        raise InputError(f"run {start.get('uid')} has no stream {stream_name!r} (it has {list(run)})")
    stream = run[stream_name]
    keys = list(stream)
    key = _frame_key(stream, frame_key, 64)
    node = stream[key]
    shape = tuple(node.shape)
    n = int(shape[0])
    height, width = int(shape[-2]), int(shape[-1])
    positions: ScanPositionsTable | None = None
    pos_keys = _position_keys(start, stream_name, keys)
    if len(pos_keys) == 2 and with_positions:
        data_keys = dict((stream.metadata or {}).get("data_keys") or {})
        y, x = (
            _to_um(np.asarray(stream[k].read(), dtype=np.float64).reshape(-1)[:n], data_keys.get(k), k)
            for k in pos_keys
        )
        grid = grid_of_positions(x, y, source=uri)
        planned = tuple(start.get("shape") or ())
        if len(planned) == 2 and grid.shape != planned and len(x) == int(np.prod(planned)):
            rows, cols = np.divmod(np.arange(n), int(planned[1]))
            grid = ScanPositionsTable(x, y, (int(planned[0]), int(planned[1])), rows, cols, uri)
        positions = grid
    instrument = None
    if isinstance(start.get("nanobeam_instrument"), Mapping):
        instrument = Instrument.from_dict(dict(start["nanobeam_instrument"]))

    def read_block(i: int, j: int) -> np.ndarray:
        return np.asarray(node[i:j]).reshape(j - i, height, width)

    return ScanSource(
        name=f"run {str(start.get('uid', '?'))[:8]}",
        n_frames=n,
        frame_shape=(height, width),
        read_block=read_block,
        positions=positions,
        instrument=instrument,
        dtype=np.dtype(node.dtype.to_numpy_dtype() if hasattr(node.dtype, "to_numpy_dtype") else np.float32),
    )
