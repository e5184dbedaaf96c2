"""The grid library a fit compares frames with, from a file or simulated in memory.

A :class:`Library` only knows how to deliver its noise-free frames one strain slab at a time,
(n_omega, n_chi, F, F); each fitter builds from those slabs exactly the matrices its method
needs, so the full 41^3 library (1.1 GB in float32) is held only by a method that needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from ..errors import InputError, NanobeamError
from ..physics import PARAMETERS, Instrument, grid_axes, iter_grid, library_instrument, open_library

__all__ = ["PARAMETERS", "Library", "LibraryMismatchError"]

#: Fitted parameters in library-axis order; omega and chi are in degrees.


class LibraryMismatchError(NanobeamError, ValueError):
    """The library cannot describe the data: another frame shape or another instrument."""


@dataclass(frozen=True, eq=False)
class Library:
    """Noise-free frames on a (strain, omega, chi) product grid.

    Attributes:
        instrument: the instrument the frames were simulated for.
        axes: grid axes ``{"strain": (n,), "omega": (n,) deg, "chi": (n,) deg}``, increasing.
        frame_pixels: side F of the (F, F) frames.
        source: where the frames come from (a path or "simulated"), for metadata.
    """

    instrument: Instrument
    axes: dict[str, np.ndarray]
    frame_pixels: int
    source: str
    _slabs: Callable[[], Iterator[np.ndarray]] = field(repr=False)

    def __post_init__(self) -> None:
        if tuple(self.axes) != PARAMETERS:
            raise InputError(f"library axes must be {PARAMETERS}, got {tuple(self.axes)}")
        for name, values in self.axes.items():
            values = np.asarray(values, dtype=np.float64)
            if values.ndim != 1 or len(values) < 3 or np.any(np.diff(values) <= 0):
                raise InputError(
                    f"library axis {name!r} must be increasing with at least 3 points, got {values}"
                )
            self.axes[name] = values

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_instrument(
        cls,
        instrument: Instrument = Instrument(),
        grid_points: int | None = None,
        *,
        upsample: int | None = None,
    ) -> Library:
        """Simulate the library in memory, slab by slab (the 41^3 grid takes about 5-20 s).

        Args:
            instrument: the instrument; its parameter ranges span the grid.
            grid_points: points per parameter (``instrument.grid_points``, 41, if None).
            upsample: simulator sub-pixels per pixel per axis (``instrument.upsample`` if None).
        """
        axes = grid_axes(instrument, grid_points)

        def slabs() -> Iterator[np.ndarray]:
            grid = iter_grid(axes["strain"], axes["omega"], axes["chi"], instrument, upsample=upsample)
            for _, slab in grid:
                yield slab

        return cls(instrument, axes, instrument.frame_pixels, "simulated", slabs)

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> Library:
        """A library opened with :func:`nanobeam_bluesky.physics.open_library` (read lazily)."""
        missing = [name for name in (*PARAMETERS, "frames") if name not in ds.variables]
        if missing:
            raise LibraryMismatchError(
                f"dataset lacks {missing}; open a library with nanobeam_bluesky.physics.open_library"
            )
        frames = ds["frames"].transpose(*PARAMETERS, "row", "col")
        axes = {name: np.asarray(ds[name].values, dtype=np.float64) for name in PARAMETERS}

        def slabs() -> Iterator[np.ndarray]:
            for i in range(frames.sizes["strain"]):
                yield np.asarray(frames[i].values, dtype=np.float32)

        return cls(library_instrument(ds), axes, int(ds.sizes["row"]), ds.attrs.get("path", "dataset"), slabs)

    @classmethod
    def from_file(cls, path: str | Path) -> Library:
        """A library file written by ``nanobeam simulate-library``."""
        return cls.from_dataset(open_library(path))

    @classmethod
    def from_arrays(
        cls, frames: np.ndarray, axes: dict[str, np.ndarray], instrument: Instrument, source: str = "arrays"
    ) -> Library:
        """Frames (n_strain, n_omega, n_chi, F, F) already in memory on the given axes."""
        frames = np.asarray(frames, dtype=np.float32)
        shape = tuple(len(axes[name]) for name in PARAMETERS)
        if frames.ndim != 5 or frames.shape[:3] != shape or frames.shape[3] != frames.shape[4]:
            raise InputError(f"frames must have shape {(*shape, 'F', 'F')}, got {frames.shape}")
        return cls(instrument, dict(axes), frames.shape[-1], source, lambda: iter(frames))

    def load(self) -> Library:
        """This library with every frame in memory (n_frames * F^2 * 4 bytes: 1.1 GB for 41^3).

        Worth it when several fitters use one simulated library: each fitter otherwise simulates
        (or reads) the frames again while it builds its matrices.
        """
        frames = np.stack([np.asarray(slab, dtype=np.float32) for slab in self._slabs()])
        return Library.from_arrays(frames, self.axes, self.instrument, source=self.source)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid points per parameter (n_strain, n_omega, n_chi)."""
        n_strain, n_omega, n_chi = (len(self.axes[name]) for name in PARAMETERS)
        return n_strain, n_omega, n_chi

    @property
    def n_frames(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_pixels(self) -> int:
        return self.frame_pixels**2

    def iter_unit_slabs(self, *, progress: bool = True, desc: str = "library") -> Iterator[np.ndarray]:
        """Yield each strain slab as unit-sum frames, float32 (n_omega * n_chi, F * F)."""
        n = self.shape[1] * self.shape[2]
        for slab in tqdm(self._slabs(), total=self.shape[0], desc=desc, disable=not progress):
            flat = np.asarray(slab, dtype=np.float64).reshape(n, self.n_pixels)
            sums = flat.sum(axis=1, keepdims=True)
            # An empty library frame (annulus fully off the detector) stays zero, never NaN.
            flat /= np.where(sums > 0, sums, 1.0)
            yield flat.astype(np.float32)

    def check_compatible(self, frame_shape: tuple[int, ...], instrument: Instrument | None = None) -> None:
        """Raise :class:`LibraryMismatchError` unless the data can be fitted with this library."""
        expected = (self.frame_pixels, self.frame_pixels)
        raw = (self.instrument.roi_pixels,) * 2
        if tuple(frame_shape) not in (expected, raw):
            raise LibraryMismatchError(
                f"the data's frames are {tuple(frame_shape)} but the library's are {expected} (raw ROIs "
                f"{raw}). Bin the data to {expected} (nanobeam_bluesky.physics.bin_roi) or make a "
                "library for this detector with `nanobeam simulate-library --instrument <config>`."
            )
        if instrument is not None:
            detail = self.instrument.describe_differences(instrument, "library", "data")
            if detail:
                raise LibraryMismatchError(
                    f"the library was simulated for another instrument ({detail}). Make one for the "
                    "data's instrument with `nanobeam simulate-library --instrument <config>` (or "
                    "Library.from_instrument), or pass allow_instrument_mismatch=True if you know the "
                    "difference does not matter."
                )
