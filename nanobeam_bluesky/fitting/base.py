"""What every grid fit shares: input checks, chunking under a memory budget, the output Dataset.

Frames are read and fitted ``chunk_size`` at a time, so the memory a fit needs beyond its library
matrices is set by the chunk size, never by the map size. The chunk size comes from a memory budget
(by default a quarter of the available memory, at most 1 GiB) divided by what one frame costs.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from .._schema import variable_attrs
from .._version import __version__
from ..errors import InputError
from ..physics import PARAMETERS, Instrument
from ..quality import FLAG_DTYPE, NO_VALUE, PhysicsCheck, prepare_frames
from .library import Library

__all__ = ["GridFitter", "available_memory_bytes", "default_memory_budget", "rows_times"]

_MAX_CHUNK = 4096
_GIB = 1 << 30


def available_memory_bytes() -> int:
    """Memory the system can give this process now (``MemAvailable``); 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * _GIB


def default_memory_budget() -> int:
    """Bytes for per-chunk intermediates: a quarter of the available memory, at most 1 GiB."""
    return int(min(_GIB, available_memory_bytes() // 4))


def rows_times(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``rows @ matrix.T`` (float32 BLAS), each output row independent of the other rows.

    One row alone would go through BLAS's matrix-vector kernel, which sums in another order than
    the matrix-matrix one; a lone row is padded to two. BLAS may still pick its kernel by matrix
    size, so chunked and unchunked fits agree to float32 rounding, not bit for bit.
    """
    if len(rows) == 1:
        return (np.concatenate([rows, np.zeros_like(rows)]) @ matrix.T)[:1]
    return rows @ matrix.T


class GridFitter(ABC):
    """Fit (strain, omega, chi) per frame against a :class:`Library`, one chunk of frames at a time.

    Subclasses build their library matrices in :meth:`_prepare` and fit one chunk in
    :meth:`_fit_chunk`.

    Args:
        library: the grid library.
        chunk_size: frames per chunk; None chooses it from ``memory_budget_bytes``.
        memory_budget_bytes: bytes allowed for per-chunk intermediates (default
            :func:`default_memory_budget`). The library matrices come on top of it.
        progress: show progress bars.
    """

    #: Name of the method in results and on the command line.
    method: ClassVar[str]
    #: One line saying what the method is, stored with every result.
    description: ClassVar[str]
    #: Extra per-frame output variables beyond strain, omega, chi: {name: (units, long_name)}.
    extra_outputs: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(
        self,
        library: Library,
        *,
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        progress: bool = True,
    ) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
            raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.library = library
        self.progress = progress
        self.memory_budget_bytes = (
            default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
        )
        self._chunk_size = None if chunk_size is None else int(chunk_size)
        #: Facts about the last :meth:`fit`: chunk size, frames, seconds, largest intermediate.
        self.last_stats: dict[str, Any] = {}
        self._largest_intermediate = 0
        self._prepare()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> GridFitter:
        """Fitter for a library file written by ``nanobeam simulate-library``."""
        return cls(Library.from_file(path), **kwargs)

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, **kwargs: Any) -> GridFitter:
        """Fitter for a library opened with :func:`nanobeam_bluesky.physics.open_library`."""
        return cls(Library.from_dataset(ds), **kwargs)

    @classmethod
    def from_instrument(
        cls,
        instrument: Instrument = Instrument(),
        grid_points: int | None = None,
        *,
        upsample: int | None = None,
        **kwargs: Any,
    ) -> GridFitter:
        """Fitter for a library simulated in memory for ``instrument`` (41^3 grid by default)."""
        return cls(Library.from_instrument(instrument, grid_points, upsample=upsample), **kwargs)

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def _prepare(self) -> None:
        """Build the library matrices the method needs."""

    @abstractmethod
    def _bytes_per_frame(self) -> int:
        """Bytes of intermediates one frame of a chunk costs (sets the automatic chunk size)."""

    @abstractmethod
    def _fit_chunk(self, counts: np.ndarray, totals: np.ndarray) -> dict[str, np.ndarray]:
        """Fit float32 counts (B, F*F) with positive totals (B,): {variable: (B,) values}."""

    # ------------------------------------------------------------------ chunking
    @property
    def chunk_size(self) -> int:
        """Frames fitted together: the given one, or the memory budget over the cost per frame."""
        if self._chunk_size is not None:
            return self._chunk_size
        return int(max(1, min(_MAX_CHUNK, self.memory_budget_bytes // self._bytes_per_frame())))

    def _track(self, *arrays: np.ndarray) -> None:
        """Record the size of per-chunk intermediates (``last_stats['largest_intermediate_bytes']``)."""
        self._largest_intermediate = max(self._largest_intermediate, *(a.nbytes for a in arrays))

    @staticmethod
    def _iter_blocks(frames: Any, chunk: int) -> Iterator[np.ndarray]:
        """Blocks of at most ``chunk`` frames (B, F, F), read lazily from (N, F, F) or (Y, X, F, F).

        Works for numpy arrays (memory-mapped too), h5py datasets, dask and xarray arrays: only a
        block is ever converted, so reading is bounded by the chunk (or one scan row), not the map.
        """
        if len(frames.shape) == 3:
            for start in range(0, frames.shape[0], chunk):
                yield np.asarray(frames[start : start + chunk])
            return
        n_y, n_x = frames.shape[:2]
        rows = max(1, chunk // n_x)
        for y0 in range(0, n_y, rows):
            block = np.asarray(frames[y0 : y0 + rows])
            block = block.reshape(-1, *block.shape[2:])
            for start in range(0, len(block), chunk):
                yield block[start : start + chunk]

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        frames: Any,
        *,
        instrument: Instrument | None = None,
        allow_instrument_mismatch: bool = False,
        mask: Any = None,
        check: bool = True,
    ) -> xr.Dataset:
        """Fit every frame.

        Args:
            frames: counts (N, F, F) in physics.md's frame, or raw ROIs (N, R, R) in the
                detector's orientation (oriented with ``instrument``'s, or the library's, flips
                and binned), or a map (scan_y, scan_x, ...) of either; a numpy, h5py, dask or xarray
                array (read chunk by chunk). One frame is taken as N = 1.
            instrument: the data's instrument; refused if it differs from the library's.
            allow_instrument_mismatch: fit anyway.
            mask: pixels to leave out of the checks (True = masked), as for ``Predictor.predict``.
            check: run the plausibility checks and the physics check of the fit's estimate.

        Returns an ``xarray.Dataset`` like the predictor's: ``strain`` (1), ``omega`` and ``chi``
        (deg), ``fit_quality`` (the deviance z-score of the frame against the forward model at
        the fit's estimate, about N(0, 1) when the estimate explains the frame), ``flag`` (see
        :class:`nanobeam_bluesky.quality.Flag`) and any method-specific variables, over dim
        ``frame`` for (N, F, F) input or dims (``scan_y``, ``scan_x``) for a map. Frames with
        non-finite or negative values (INVALID), no counts at all (LOW_COUNTS) or no ring (NO_RING)
        get NaN.
        """
        shape = tuple(getattr(frames, "shape", np.shape(frames)))
        if len(shape) == 2:
            frames, shape = np.asarray(frames)[None], (1, *shape)
        if len(shape) not in (3, 4):
            raise InputError(f"frames must be (N, F, F) or a map (scan_y, scan_x, F, F); got shape {shape}")
        self.library.check_compatible(shape[-2:], None if allow_instrument_mismatch else instrument)
        data_instrument = instrument or self.library.instrument
        physics = PhysicsCheck.for_instrument(data_instrument) if check else None
        n = int(np.prod(shape[:-2]))
        names = (*PARAMETERS, *self.extra_outputs)
        out = {name: np.full(n, np.nan) for name in (*names, "fit_quality")}
        flags = np.zeros(n, dtype=FLAG_DTYPE)
        chunk = self.chunk_size
        self._largest_intermediate = 0
        start_time = time.perf_counter()
        done = 0
        with tqdm(total=n, desc=f"fit ({self.method})", unit="frame", disable=not self.progress) as bar:
            for block in self._iter_blocks(frames, chunk):
                b = len(block)
                prepared = prepare_frames(
                    block,
                    data_instrument,
                    mask=mask,
                    min_total_counts=1e-9,
                    min_frame_intensity=physics.min_frame_intensity if physics else None,
                )
                block_flags = prepared.flags
                usable = (block_flags & FLAG_DTYPE(NO_VALUE)) == 0
                if usable.any():
                    counts = prepared.counts.reshape(b, -1)[usable]
                    values = self._fit_chunk(counts, counts.sum(axis=1, dtype=np.float64))
                    for name in names:
                        out[name][done : done + b][usable] = values[name]
                    if physics is not None:
                        estimate = np.stack([values[p] for p in PARAMETERS], 1)
                        masked = None if prepared.masked is None else prepared.masked[usable]
                        result = physics(prepared.counts[usable], estimate, masked, refine=False)
                        out["fit_quality"][done : done + b][usable] = result.fit_quality
                        block_flags[usable] |= result.flags
                        lost = (block_flags & FLAG_DTYPE(NO_VALUE)) != 0
                        for name in names:
                            out[name][done : done + b][lost] = np.nan
                flags[done : done + b] = block_flags
                done += b
                bar.update(b)
        self.last_stats = {
            "method": self.method,
            "frames": n,
            "chunk_size": chunk,
            "seconds": time.perf_counter() - start_time,
            "largest_intermediate_bytes": self._largest_intermediate,
        }
        return self._dataset(out, flags, shape[:-2])

    def _dataset(
        self, out: dict[str, np.ndarray], flags: np.ndarray, map_shape: tuple[int, ...]
    ) -> xr.Dataset:
        dims = ("frame",) if len(map_shape) == 1 else ("scan_y", "scan_x")
        coords = {dim: np.arange(size) for dim, size in zip(dims, map_shape, strict=True)}
        data: dict[str, Any] = {}
        for name in PARAMETERS:
            data[name] = (dims, out[name].reshape(map_shape), variable_attrs(name, f"{self.method} fit"))
        for name, (units, long_name) in self.extra_outputs.items():
            data[name] = (dims, out[name].reshape(map_shape), {"units": units, "long_name": long_name})
        data["fit_quality"] = (dims, out["fit_quality"].reshape(map_shape), variable_attrs("fit_quality"))
        data["flag"] = (dims, flags.reshape(map_shape), variable_attrs("flag"))
        lib = self.library
        return xr.Dataset(
            data,
            coords=coords,
            attrs={
                "method": self.method,
                "method_description": self.description,
                "library_source": lib.source,
                "library_grid": json.dumps(
                    {k: [float(v[0]), float(v[-1]), len(v)] for k, v in lib.axes.items()}
                ),
                "instrument": lib.instrument.to_json(),
                "chunk_size": int(self.last_stats.get("chunk_size", 0)),
                "nanobeam_bluesky_version": __version__,
            },
        )
