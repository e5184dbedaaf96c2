"""The simulated library: noise-free frames on a (strain, omega, chi) grid, in one HDF5 file.

Layout (``format = "nanobeam-library"``, version 1):

* ``frames``: float32 (n_strain, n_omega, n_chi, F, F), chunked one (strain, omega) row per chunk,
  shuffled and compressed;
* ``strain``, ``omega``, ``chi``: the grid axes (omega and chi in degrees);
* ``labels``: (n_strain, n_omega, n_chi, 3) the parameters of every frame;
* attributes: the full instrument (JSON), ``scale`` (the library-wide maximum intensity: counts
  are ``max_counts * frames / scale``), ``max_counts``, ``upsample``, the package version, and
  ``complete``. The file is written under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask.array
import h5py
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import NanobeamError
from .forward import iter_grid
from .instrument import PARAMETERS, Instrument

__all__ = [
    "LibraryError",
    "check_library_attrs",
    "grid_axes",
    "library_instrument",
    "open_library",
    "write_library",
]

FORMAT = "nanobeam-library"
FORMAT_VERSION = 1


class LibraryError(NanobeamError, ValueError):
    """A library file that is missing, incomplete, corrupt or of another format."""


def grid_axes(instrument: Instrument, grid_points: int | None = None) -> dict[str, np.ndarray]:
    """Evenly spaced axes spanning the instrument's parameter ranges, ends included."""
    n = instrument.grid_points if grid_points is None else grid_points
    return {name: np.linspace(low, high, n) for name, (low, high) in instrument.parameter_ranges.items()}


def write_library(
    path: str | Path,
    instrument: Instrument = Instrument(),
    *,
    grid_points: int | None = None,
    upsample: int | None = None,
    max_counts: float = 7.0,
    compression: str | None = "lzf",
    progress: bool = True,
) -> Path:
    """Simulate the grid library and write it to ``path`` (HDF5). Returns the path."""
    path = Path(path)
    axes = grid_axes(instrument, grid_points)
    s = instrument.upsample if upsample is None else upsample
    n_pix = instrument.frame_pixels
    shape = (*tuple(len(a) for a in axes.values()), n_pix, n_pix)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(partial, "w") as h5:
            h5.attrs.update(
                format=FORMAT,
                format_version=FORMAT_VERSION,
                complete=False,
                instrument=instrument.to_json(),
                upsample=s,
                max_counts=max_counts,
                nanobeam_bluesky_version=__version__,
                normalisation="library-wide: counts = max_counts * frames / scale",
            )
            for name, values in axes.items():
                h5.create_dataset(name, data=values)
                h5[name].make_scale(name)
            # Per-frame labels (strain, omega_deg, chi_deg), redundant with the axes but explicit.
            grids = np.meshgrid(*axes.values(), indexing="ij")
            labels = h5.create_dataset("labels", data=np.stack(grids, axis=-1))
            labels.attrs["columns"] = list(PARAMETERS)
            frames = h5.create_dataset(
                "frames",
                shape=shape,
                dtype="f4",
                chunks=(1, 1, *shape[2:]),
                compression=compression,
                shuffle=compression is not None,
            )
            for dim, name in enumerate(axes):
                frames.dims[dim].attach_scale(h5[name])
            frames.attrs["units"] = "intensity (Laue maximum = 1)"
            peak = 0.0
            slabs = iter_grid(axes["strain"], axes["omega"], axes["chi"], instrument, upsample=s)
            for i, slab in tqdm(slabs, total=shape[0], desc="library", disable=not progress):
                frames[i] = slab
                peak = max(peak, float(slab.max()))
            h5.attrs["scale"] = peak
            h5.attrs["complete"] = True
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return path


def open_library(path: str | Path) -> xr.Dataset:
    """Open a library lazily as an ``xarray.Dataset``; frames load chunk by chunk (dask).

    Dims: strain, omega, chi, row, col. ``attrs`` holds the instrument (as JSON), ``scale``,
    ``max_counts`` and ``upsample``. The file stays open while the dataset is in use.
    """
    path = Path(path)
    if not path.exists():
        raise LibraryError(f"no library at {path}; make one with `nanobeam simulate-library --out {path}`")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise LibraryError(f"{path} is not a readable HDF5 library ({exc}); regenerate it") from exc
    attrs = dict(h5.attrs)
    try:
        check_library_attrs(attrs, path)
    except LibraryError:
        h5.close()
        raise
    frames = h5["frames"]
    data = dask.array.from_array(frames, chunks=frames.chunks)
    coords: dict[str, tuple[str, np.ndarray] | np.ndarray | list[str]] = {
        name: (name, h5[name][()]) for name in PARAMETERS
    }
    n_pix = frames.shape[-1]
    coords |= {"row": np.arange(n_pix), "col": np.arange(n_pix), "parameter": list(PARAMETERS)}
    ds = xr.Dataset(
        {
            "frames": (("strain", "omega", "chi", "row", "col"), data),
            "labels": (("strain", "omega", "chi", "parameter"), h5["labels"][()]),
        },
        coords=coords,
        attrs={
            "instrument": attrs["instrument"],
            "scale": float(attrs["scale"]),
            "max_counts": float(attrs["max_counts"]),
            "upsample": int(attrs["upsample"]),
            "nanobeam_bluesky_version": str(attrs.get("nanobeam_bluesky_version", "")),
            "path": str(path),
        },
    )
    ds["omega"].attrs["units"] = "deg"
    ds["chi"].attrs["units"] = "deg"
    ds["strain"].attrs["units"] = "1"
    ds.set_close(h5.close)
    return ds


def check_library_attrs(attrs: Mapping[str, Any], path: str | Path) -> None:
    """Raise :class:`LibraryError` unless a file's attributes say: a complete nanobeam library."""
    if attrs.get("format") != FORMAT:
        raise LibraryError(f"{path} is not a nanobeam library (format={attrs.get('format')!r})")
    if not attrs.get("complete", False):
        raise LibraryError(f"{path} is incomplete (its writer was interrupted); regenerate it")


def library_instrument(ds: xr.Dataset) -> Instrument:
    """The instrument a library was simulated for."""
    return Instrument.from_dict(json.loads(ds.attrs["instrument"]))
