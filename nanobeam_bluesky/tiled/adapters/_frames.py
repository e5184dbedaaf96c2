"""Detector frames of a scan, read on request: raw, and ROI-cut and binned to the model's input.

- :class:`HDF5Frames` reads a region of an HDF5 frames dataset through the guard (``open_hdf5``)
  at every request, so a file rewritten with a link to another file is refused at once;
- :class:`TiffFramesAdapter` is tiled's own TIFF sequence adapter over a list of files, in the
  order given (the caller sorts them);
- :class:`ScanFramesAdapter` serves raw frames from a reader, :func:`binned_frames` the ROI around
  the central reflected ray, binned (the 64 x 64 frames the model takes), from the same reader.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from tiled.adapters.sequence import IO_WORKERS
from tiled.adapters.tiff import TiffSequenceAdapter
from tiled.ndslice import NDSlice
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import Spec

from ...physics import Instrument, bin_roi, roi_origin
from ...scanfile import ScanFileError
from .._http import served_errors
from ._arrays import BlockwiseArrayAdapter, h5_read
from ._guard import open_hdf5

__all__ = [
    "SCAN_SPEC",
    "HDF5Frames",
    "ScanFramesAdapter",
    "TiffFramesAdapter",
    "binned_frames",
    "frame_chunks",
]

#: Spec of a scan's node (raw frames, binned frames, positions), whatever file it comes from.
SCAN_SPEC = Spec("nanobeam-scan", version="1")
#: Target size of one served chunk (bytes): whole scan rows when frames are small.
_CHUNK_BYTES = 8 * 2**20
#: A region of the raw frames (one int or slice per served dimension) -> the counts there.
RawReader = Callable[[tuple[int | slice, ...]], np.ndarray]


def frame_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, ...], ...]:
    """Chunk along the scan's last axis so a chunk holds <= ~8 MB; detector axes whole."""
    frame_bytes = shape[-1] * shape[-2] * itemsize
    per_chunk = max(1, min(shape[-3], _CHUNK_BYTES // frame_bytes))
    n = shape[-3]
    along = tuple([per_chunk] * (n // per_chunk) + ([n % per_chunk] if n % per_chunk else []))
    lead = tuple((1,) * shape[i] for i in range(len(shape) - 3))
    return (*lead, along, (shape[-2],), (shape[-1],))


class HDF5Frames:
    """Reads a region of one HDF5 frames dataset, opening (and checking) the file each time.

    ``singleton_axis``: an axis of length 1 that is stored but not served (areaDetector's
    (N, 1, H, W) stacks are served as (N, H, W)); the region is in served coordinates.
    """

    def __init__(self, path: Path, dataset: str, singleton_axis: int | None = None) -> None:
        self.path = path
        self.dataset = dataset
        self.singleton_axis = singleton_axis

    def __call__(self, index: tuple[int | slice, ...]) -> np.ndarray:
        if self.singleton_axis is not None:
            at = self.singleton_axis
            index = (*index[:at], 0, *index[at:])
        try:
            with open_hdf5(self.path) as h5:
                return h5_read(h5[self.dataset], index)
        except (OSError, KeyError) as exc:
            raise ScanFileError(
                f"{self.path.name}: cannot read frames ({exc}); the file is corrupt or truncated"
            ) from exc


class ScanFramesAdapter(BlockwiseArrayAdapter):
    """Raw detector frames, read from the scan's file(s) on request."""

    label = "scan frames"

    def __init__(self, read: RawReader, structure: ArrayStructure, **kwargs: Any) -> None:
        super().__init__(structure, **kwargs)
        self._read_raw = read

    def _read(self, index: tuple[int | slice, ...]) -> np.ndarray:
        return self._read_raw(index)


class BinnedFramesAdapter(BlockwiseArrayAdapter):
    """ROI-cut, binned frames (float32 counts), computed from the raw frames on request."""

    label = "binned frames"

    def __init__(
        self,
        read: RawReader,
        roi_center_px: tuple[float, float],
        roi: int,
        binning: int,
        instrument: Instrument,
        structure: ArrayStructure,
        **kwargs: Any,
    ) -> None:
        super().__init__(structure, **kwargs)
        self._read_raw = read
        self._roi_center = roi_center_px
        self._roi = roi
        self._binning = binning
        self._instrument = instrument

    def _read(self, index: tuple[int | slice, ...]) -> np.ndarray:
        row0 = round(self._roi_center[0]) - self._roi // 2
        col0 = round(self._roi_center[1]) - self._roi // 2
        cut = (*index[:-2], slice(row0, row0 + self._roi), slice(col0, col0 + self._roi))
        raw = self._read_raw(cut)
        half = self._roi // 2
        binned = bin_roi(raw, (half, half), self._roi, self._binning, instrument=self._instrument)
        return binned[(Ellipsis, *index[-2:])]


def binned_frames(
    read: RawReader,
    name: str,
    scan_shape: tuple[int, ...],
    scan_dims: tuple[str, ...],
    detector_shape: tuple[int, int],
    center: tuple[float, float],
    roi: int,
    binning: int,
    instrument: Instrument,
) -> BinnedFramesAdapter:
    """The ``binned`` node of a scan whose raw frames ``read`` gives (``name`` names the scan in
    errors): the ``roi`` x ``roi`` ROI around ``center`` (raw pixels), summed ``binning`` x
    ``binning``, in the instrument's detector orientation."""
    try:
        roi_origin(center, roi, detector_shape)
    except ValueError as exc:
        raise ScanFileError(f"{name}: {exc}; fix roi_center_px in the server config") from None
    if roi % binning:
        raise ScanFileError(f"roi ({roi}) must be a multiple of binning ({binning})")
    n = roi // binning
    shape = (*scan_shape, n, n)
    return BinnedFramesAdapter(
        read,
        center,
        roi,
        binning,
        instrument,
        ArrayStructure(
            data_type=BuiltinDtype.from_numpy_dtype(np.dtype("float32")),
            shape=shape,
            chunks=frame_chunks(shape, 4),
            dims=(*scan_dims, "row", "col"),
        ),
        metadata={
            "attrs": {
                "units": "counts",
                "roi_center_px": list(center),
                "roi": roi,
                "binning": binning,
                "reduce": "sum",
            }
        },
        specs=[Spec("xarray_data_var")],
    )


def _read_tiff(filename: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One TIFF file's frame, of ``shape`` when given. The name is a name: ``tifffile.imread``
    would take one holding * or ? as a glob pattern."""
    try:
        with tifffile.TiffFile(filename) as tif:
            frame = tif.asarray()
    except (OSError, ValueError) as exc:  # tifffile's errors are ValueErrors
        raise ScanFileError(
            f"{Path(filename).name} is not a readable TIFF ({exc}); replace or remove it"
        ) from exc
    if shape is not None and frame.shape != shape:
        raise ScanFileError(
            f"{Path(filename).name} is {frame.shape}, the scan's frames {shape}; every frame must be "
            "the same size"
        )
    return frame


class TiffFramesAdapter(TiffSequenceAdapter):
    """tiled's TIFF sequence adapter (one file per frame, (N, H, W)) over ``files`` in the order
    given; tiled's adapter keeps the order it is given too (it does not sort).

    Three changes: the files are kept as paths, not URIs (tiled's ``path_from_uri`` does not undo
    percent-encoding and cuts a name at '#' or '?'); file names are never taken as glob patterns
    (tifffile's ``TiffSequence`` takes a lone name as one, its ``imread`` a name holding * or ?),
    and a frame of another size is named; errors become HTTP errors with their message
    (``_http.served_errors``) instead of opaque 500s that the client retries.
    """

    label = "TIFF frames"

    def __init__(
        self,
        files: Sequence[Path],
        structure: ArrayStructure,
        *,
        metadata: dict[str, Any] | None = None,
        specs: list[Spec] | None = None,
    ) -> None:
        super().__init__(data_uris=[], structure=structure, metadata=metadata, specs=specs)
        self.filepaths = [os.fspath(p) for p in files]

    def _load_from_files(
        self, which: builtins.slice | int | Iterable[int] = builtins.slice(None)
    ) -> np.ndarray:
        if isinstance(which, int):
            selected = [self.filepaths[which]]
        elif isinstance(which, builtins.slice):
            selected = self.filepaths[which]
        else:
            selected = [self.filepaths[i] for i in which]
        if not selected:
            structure = self.structure()
            return np.empty((0, *structure.shape[1:]), dtype=structure.data_type.to_numpy_dtype())
        shape = tuple(self.structure().shape[1:])

        def read_frame(filename: str, **kwargs: Any) -> np.ndarray:
            return _read_tiff(filename, shape)

        return tifffile.TiffSequence(selected, imread=read_frame).asarray(ioworkers=IO_WORKERS)

    def _read_one(self, filepath: str) -> np.ndarray:
        return _read_tiff(filepath, tuple(self.structure().shape[1:]))

    def read(self, slice: Any = NDSlice(...)) -> np.ndarray:
        with served_errors(self.label):
            return super().read(slice)

    def read_block(self, block: Any, slice: Any = NDSlice(...)) -> np.ndarray:
        with served_errors(self.label):
            return super().read_block(block, slice)
