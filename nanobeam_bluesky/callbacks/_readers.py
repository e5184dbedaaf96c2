"""Reading externally stored frames: HDF5 StreamResources (SWMR) and legacy AD_HDF5 resources."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import h5py
import numpy as np

from ..errors import NanobeamError

__all__ = ["AreaDetectorHDF5Handler", "StreamReadError", "StreamResourceReader", "path_from_uri"]

HDF5_MIMETYPES = ("application/x-hdf5", "application/x-hdf5-swmr")


class StreamReadError(NanobeamError, OSError):
    """Frames named by a StreamDatum/Datum could not be read."""


def path_from_uri(uri: str) -> Path:
    """A local path from a ``file://host/path`` URI (or a plain path)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else uri))
    raise StreamReadError(f"cannot read {uri!r}: only file:// URIs are supported")


def _open_swmr(path: Path, timeout_s: float) -> h5py.File:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return h5py.File(path, "r", libver="latest", swmr=True)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise StreamReadError(f"could not open {path} for SWMR reading: {exc}") from exc
            time.sleep(0.005)


class StreamResourceReader:
    """Reads rows ``[start, stop)`` of one HDF5 dataset that another writer is still growing.

    The file is opened once in SWMR mode; before each read the dataset is refreshed, and if the
    writer has not flushed the rows yet the read waits (up to ``timeout_s``) for them.
    """

    def __init__(self, stream_resource: Mapping[str, Any], *, timeout_s: float = 10.0) -> None:
        mimetype = stream_resource.get("mimetype", "")
        if mimetype not in HDF5_MIMETYPES:
            raise StreamReadError(
                f"StreamResource {stream_resource.get('uid')} has mimetype {mimetype!r}; only HDF5 "
                f"({', '.join(HDF5_MIMETYPES)}) is supported"
            )
        self.path = path_from_uri(stream_resource["uri"])
        params = stream_resource.get("parameters", {})
        self.dataset_path = params.get("dataset") or params.get("path") or "/entry/data/data"
        self.timeout_s = timeout_s
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None

    def _dset(self) -> h5py.Dataset:
        if self._dataset is None:
            self._file = _open_swmr(self.path, self.timeout_s)
            deadline = time.monotonic() + self.timeout_s
            while self.dataset_path not in self._file:
                if time.monotonic() > deadline:
                    raise StreamReadError(f"{self.path} has no dataset {self.dataset_path}")
                time.sleep(0.005)
                self._file.close()
                self._file = _open_swmr(self.path, self.timeout_s)
            self._dataset = self._file[self.dataset_path]
        return self._dataset

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (first axis) of the dataset."""
        dset = self._dset()
        deadline = time.monotonic() + self.timeout_s
        while True:
            dset.refresh()
            if dset.shape[0] >= stop:
                return dset[start:stop]
            if time.monotonic() > deadline:
                raise StreamReadError(
                    f"{self.path}:{self.dataset_path} has {dset.shape[0]} rows after {self.timeout_s} s; "
                    f"rows {start}..{stop - 1} were announced"
                )
            time.sleep(0.002)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._dataset = None


class AreaDetectorHDF5Handler:
    """Handler for the legacy ``AD_HDF5``/``AD_HDF5_SWMR`` specs (area detector HDF5 plugin).

    Resource kwargs: ``frame_per_point``; datum kwargs: ``point_number``. Returns the
    ``frame_per_point`` frames of that point, shape (frame_per_point, H, W).
    """

    specs = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})

    def __init__(
        self,
        filename: str,
        frame_per_point: int = 1,
        dataset: str = "/entry/data/data",
        timeout_s: float = 10.0,
    ) -> None:
        self._reader = StreamResourceReader(
            {"mimetype": HDF5_MIMETYPES[0], "uri": str(filename), "parameters": {"dataset": dataset}},
            timeout_s=timeout_s,
        )
        self.frame_per_point = frame_per_point

    def __call__(self, point_number: int) -> np.ndarray:
        start = point_number * self.frame_per_point
        return self._reader.read(start, start + self.frame_per_point)

    def close(self) -> None:
        self._reader.close()
