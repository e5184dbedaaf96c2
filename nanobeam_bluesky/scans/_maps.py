"""A scan on disk to ε/ω/χ maps: chunked reading overlapped with the model, results on the scan grid."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .._schema import PARAMETERS
from ..inference import Prediction, Predictor
from ..physics import Instrument
from ..quality import FLAG_BITS, FLAG_DTYPE, NO_VALUE, Flag, PooledConsistency
from ._sources import ScanSource

__all__ = ["ScanMaps", "predict_scan", "save_scan_maps", "write_maps"]

#: Raw ROI bytes per chunk: bounds memory whatever the scan's length.
_CHUNK_BYTES = 64 * 2**20


@dataclass
class ScanMaps:
    """The maps of one scan and how they were made."""

    dataset: xr.Dataset
    frames: int
    #: Wall time of reading and predicting together, s.
    seconds: float
    #: Rows per flag name (only the flags that occur).
    flagged: dict[str, int]
    #: Frames that could not be read (flagged INVALID) and why, one line each.
    problems: list[str] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


def _chunk_frames(source: ScanSource, roi: int, chunk_frames: int | None) -> int:
    if chunk_frames is not None:
        return max(1, int(chunk_frames))
    height, width = source.frame_shape
    # Reading takes whole detector frames before the ROI is cut: bound those bytes.
    per_frame = height * width * max(4, source.dtype.itemsize)
    return int(np.clip(_CHUNK_BYTES // per_frame, 64, 4096))


def predict_scan(
    source: ScanSource,
    predictor: Predictor,
    *,
    instrument: Instrument | None = None,
    roi_center_px: tuple[float, float] | None = None,
    allow_instrument_mismatch: bool = False,
    chunk_frames: int | None = None,
    progress: bool = True,
    fit_film: bool = True,
    mask: np.ndarray | None = None,
) -> ScanMaps:
    """Maps of (strain, omega, chi) with errors and flags for every frame of ``source``.

    Frames are read a chunk at a time on a second thread while the model works on the chunk
    before (memory stays bounded whatever the scan's length); the physics check is pooled over
    the whole scan (a POOLED_MISMATCH verdict flags every measured frame, as ``predict()``
    does within one call).

    Args:
        instrument: the data's instrument (orientation, masks, saturation); default the file's,
            else the model's. One the model was not trained for is an error unless
            ``allow_instrument_mismatch``.
        roi_center_px: (row, col) of the central reflected ray on the detector (raw pixels) when
            the frames are whole detector images; default the file's.
        chunk_frames: frames per chunk (default: about 64 MB of raw frames).
        fit_film: fit each frame's film with a model that predicts it (False: the instrument's
            film, as ``Predictor.predict``'s ``fit_film``).
        mask: more pixels to leave out (True = masked): a raw ROI (R, R) in the detector's
            orientation, as ``nanobeam calibrate --out-mask`` writes, or a binned (F, F) frame.
    """
    from tqdm.auto import tqdm

    data_instrument = instrument or source.instrument
    predictor.check_instrument(data_instrument, allow_mismatch=allow_instrument_mismatch)
    inst = data_instrument or predictor.instrument
    read = source.roi_reader(inst.roi_pixels, roi_center_px)
    roi = inst.roi_pixels
    # What the reader hands over: ROIs, or frames already that size (or binned)
    shape = source.frame_shape if source.frame_shape in ((roi, roi), (roi // 2, roi // 2)) else (roi, roi)
    n = source.n_frames
    step = _chunk_frames(source, inst.roi_pixels, chunk_frames)
    spans = [(i, min(i + step, n)) for i in range(0, n, step)]
    pooled = PooledConsistency()
    parts: list[Prediction] = []
    problems: list[str] = []
    t0 = time.perf_counter()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="nanobeam-read") as pool,
        tqdm(total=n, unit="frame", desc=source.name, disable=not progress) as bar,
    ):
        ahead: list[Future[_Chunk]] = [pool.submit(_read_chunk, read, *span, shape) for span in spans[:2]]
        for k in range(len(spans)):
            chunk = ahead.pop(0).result()
            if k + 2 < len(spans):  # keep two chunks in flight: reading overlaps the model
                ahead.append(pool.submit(_read_chunk, read, *spans[k + 2], shape))
            part = predictor.analyse(
                chunk.frames,
                instrument=data_instrument,
                check_instrument=False,
                pooled=pooled,
                fit_film=fit_film,
                mask=mask,
            )
            _flag_unreadable(part, chunk.unreadable)
            problems += chunk.problems
            parts.append(part)
            bar.update(len(chunk.frames))
    seconds = time.perf_counter() - t0
    prediction = _concatenate(parts)
    if pooled.mismatch:  # the verdict of the whole scan, for every frame it covers
        measured = (prediction.flags & FLAG_DTYPE(NO_VALUE)) == 0
        prediction.flags[measured] |= FLAG_DTYPE(Flag.POOLED_MISMATCH)
    prediction.pooled = pooled.summary(inst.film_thickness_angstrom)
    per_frame = predictor.to_dataset(prediction)
    dataset = _on_grid(per_frame, source)
    flags = prediction.flags
    flagged = {
        name: int(np.count_nonzero(flags & FLAG_DTYPE(bit)))
        for name, bit in FLAG_BITS.items()
        if np.any(flags & FLAG_DTYPE(bit))
    }
    dataset.attrs.update(
        source=source.name,
        frames=n,
        instrument=json.dumps(inst.to_dict(), sort_keys=True, default=list),
    )
    if problems:
        dataset.attrs["problems"] = "; ".join(problems)
    return ScanMaps(dataset, n, seconds, flagged, problems)


@dataclass
class _Chunk:
    """Frames read for the model, and which of them could not be read (zeros there)."""

    frames: np.ndarray
    unreadable: np.ndarray
    problems: list[str]


#: What a damaged file raises while its frames are read.
_READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def _read_chunk(
    read: Callable[[int, int], np.ndarray], start: int, stop: int, shape: tuple[int, int]
) -> _Chunk:
    """Frames ``start..stop-1``; when the chunk cannot be read whole, frame by frame, so that one
    damaged frame costs its own row (flagged INVALID), not the scan."""
    try:
        return _Chunk(np.asarray(read(start, stop)), np.zeros(stop - start, dtype=bool), [])
    except _READ_ERRORS:
        pass
    frames: list[np.ndarray | None] = []
    problems: list[str] = []
    for i in range(start, stop):
        try:
            frames.append(np.asarray(read(i, i + 1))[0])
        except _READ_ERRORS as exc:
            frames.append(None)
            problems.append(f"frame {i} unreadable ({exc})")
    unreadable = np.array([f is None for f in frames])
    blank = np.zeros(shape, dtype=np.float32)
    stacked = np.stack([blank if f is None else f.astype(np.float32, copy=False) for f in frames])
    return _Chunk(stacked, unreadable, problems)


def _flag_unreadable(part: Prediction, unreadable: np.ndarray) -> None:
    if not unreadable.any():
        return
    part.flags[unreadable] = FLAG_DTYPE(Flag.INVALID)
    films = (part.thickness, part.thickness_std, part.thickness_err)
    for values in (
        part.values,
        part.std,
        part.err,
        *part.checks.values(),
        *(f for f in films if f is not None),
    ):
        values[unreadable] = np.nan


def _concatenate(parts: list[Prediction]) -> Prediction:
    first = parts[0]
    return Prediction(
        values=np.concatenate([p.values for p in parts]),
        std=np.concatenate([p.std for p in parts]),
        err=np.concatenate([p.err for p in parts]),
        flags=np.concatenate([p.flags for p in parts]).astype(FLAG_DTYPE),
        checks={k: np.concatenate([p.checks[k] for p in parts]) for k in first.checks},
        estimator=first.estimator,
        refined=first.refined,
        pooled=first.pooled,
        **{
            name: None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in parts])
            for name in ("thickness", "thickness_std", "thickness_err")
        },
    )


def _on_grid(per_frame: xr.Dataset, source: ScanSource) -> xr.Dataset:
    """Per-frame results placed on the scan grid (scan_y, scan_x), or over ``point`` for a line
    scan; positions in µm. Grid cells without a frame are NaN, flagged INVALID, ``frame`` -1."""
    positions = source.positions
    n = source.n_frames
    if positions is None or positions.row is None or positions.col is None:
        ds = per_frame.rename(frame="point")
        if positions is not None:
            ds = ds.assign_coords(
                x_um=("point", positions.x_um, {"units": "µm", "long_name": "sample x"}),
                y_um=("point", positions.y_um, {"units": "µm", "long_name": "sample y"}),
            )
        return ds
    n_y, n_x = positions.shape
    rows, cols = positions.row, positions.col
    data: dict[str, Any] = {}
    for name, var in per_frame.data_vars.items():
        values = var.values
        if values.dtype.kind == "f":
            grid = np.full((n_y, n_x), np.nan, dtype=values.dtype)
        else:
            grid = np.full((n_y, n_x), FLAG_DTYPE(Flag.INVALID) if name == "flag" else 0, dtype=values.dtype)
        grid[rows, cols] = values
        data[str(name)] = (("scan_y", "scan_x"), grid, dict(var.attrs))
    index = np.full((n_y, n_x), -1, dtype=np.int64)
    index[rows, cols] = np.arange(n)
    data["frame"] = (("scan_y", "scan_x"), index, {"long_name": "the frame measured here (-1: none)"})
    for axis, values in (("x", positions.x_um), ("y", positions.y_um)):
        grid = np.full((n_y, n_x), np.nan)
        grid[rows, cols] = values
        data[f"position_{axis}_um"] = (
            ("scan_y", "scan_x"),
            grid,
            {"units": "µm", "long_name": f"sample {axis} where the frame was taken"},
        )
    with warnings.catch_warnings():  # a grid column with no frame: NaN, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        x_axis = np.nanmean(data["position_x_um"][1], axis=0)
        y_axis = np.nanmean(data["position_y_um"][1], axis=1)
    ds = xr.Dataset(
        data,
        coords={
            "x_um": ("scan_x", x_axis, {"units": "µm", "long_name": "sample x (column mean)"}),
            "y_um": ("scan_y", y_axis, {"units": "µm", "long_name": "sample y (row mean)"}),
        },
        attrs=dict(per_frame.attrs),
    )
    for key, truth in source.truth.items():
        name = {"omega_deg": "omega", "chi_deg": "chi"}.get(key, key)
        if name in PARAMETERS and truth.shape == (n_y, n_x):
            ds[f"{name}_true"] = (("scan_y", "scan_x"), truth, {"units": ds[name].attrs.get("units", "")})
    return ds


def _netcdf_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes NetCDF can store: numbers, strings and arrays; the rest as JSON text."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bool | np.bool_):
            out[key] = int(value)
        elif isinstance(value, str | int | float | np.number | np.ndarray):
            out[key] = value
        elif value is None:
            out[key] = ""
        else:
            out[key] = json.dumps(value, default=str)
    return out


def write_maps(dataset: xr.Dataset, path: str | Path) -> Path:
    """The maps as NetCDF-4 (HDF5; any name, e.g. ``.nc`` or ``.h5``), readable with
    ``xarray.open_dataset``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dataset.copy()
    out.attrs = _netcdf_attrs(dict(dataset.attrs))
    for name in out.variables:
        out[name].attrs = _netcdf_attrs(dict(out[name].attrs))
    out.to_netcdf(path, engine="h5netcdf", invalid_netcdf=False)
    return path


def save_scan_maps(dataset: xr.Dataset, path: str | Path, title: str = "") -> Path:
    """A PNG of the ε, ω, χ maps (top) and their errors (bottom), with units and colour bars;
    flagged points in grey. Axes in µm on a grid, else the values along the scan."""
    from ..plotting import save_result_maps

    return save_result_maps(path, dataset, title or str(dataset.attrs.get("source", "")))
