"""The simulated library as a Tiled container: from its HDF5 file, or simulated on demand.

Both adapters serve the same tree, in the ``xarray_dataset`` convention (so
``client["library"].read()`` gives an ``xarray.Dataset`` shaped like
:func:`nanobeam_bluesky.physics.open_library`)::

    frames   float32 (strain, omega, chi, row, col); one chunk per (strain, omega) row of chi
    strain   grid axis, dimensionless
    omega    grid axis, degrees
    chi      grid axis, degrees
    row, col pixel indices of the binned 64 x 64 frame

The container's metadata carries the instrument (a dict, so it can be queried) under the spec
``nanobeam-library``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import Spec
from tiled.utils import path_from_uri

from ..._version import __version__
from ...physics import PARAMETERS, UNITS, Instrument, LibraryError, grid_axes, simulate
from ...physics.library import check_library_attrs
from .._errors import DataError
from .._http import served_errors
from ._arrays import (
    BlockwiseArrayAdapter,
    ContainerAdapter,
    check_parameters,
    coordinate,
    h5_read,
    selected,
)
from ._guard import named_instrument, open_hdf5

if TYPE_CHECKING:
    from tiled.catalog.orm import Node
    from tiled.structures.data_source import DataSource

__all__ = [
    "LIBRARY_SPEC",
    "MAX_SIMULATED_FRAMES",
    "LazyLibraryAdapter",
    "SimulatedLibraryAdapter",
]

LIBRARY_SPEC = Spec("nanobeam-library", version="1")
_DIMS = ("strain", "omega", "chi", "row", "col")
#: Largest number of frames one request to the lazy library may simulate (~330 MB of float32).
MAX_SIMULATED_FRAMES = 20_000


def _frames_structure(shape: tuple[int, ...], chunks: tuple[int, ...]) -> ArrayStructure:
    return ArrayStructure(
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype("float32")),
        shape=shape,
        chunks=tuple(
            tuple([c] * (n // c) + ([n % c] if n % c else [])) for n, c in zip(shape, chunks, strict=True)
        ),
        dims=_DIMS,
    )


def _children(frames: BlockwiseArrayAdapter, axes: dict[str, np.ndarray], n_pix: int) -> dict[str, Any]:
    children: dict[str, Any] = {"frames": frames}
    for name, values in axes.items():
        children[name] = coordinate(values, (name,), UNITS[name])
    children["row"] = coordinate(np.arange(n_pix), ("row",), "binned pixel")
    children["col"] = coordinate(np.arange(n_pix), ("col",), "binned pixel")
    return children


def _specs() -> list[Spec]:
    return [LIBRARY_SPEC, Spec("xarray_dataset")]


class LibraryFramesAdapter(BlockwiseArrayAdapter):
    """Frames read from the library file, chunk by chunk, on request."""

    label = "library frames"

    def __init__(self, path: Path, structure: ArrayStructure, **kwargs: Any) -> None:
        super().__init__(structure, **kwargs)
        self._path = path

    def _read(self, index: tuple[int | slice, ...]) -> np.ndarray:
        with open_hdf5(self._path) as h5:
            return h5_read(h5["frames"], index)


class SimulatedFramesAdapter(BlockwiseArrayAdapter):
    """Frames simulated on request with :func:`nanobeam_bluesky.physics.simulate`."""

    label = "simulated library frames"

    def __init__(
        self,
        instrument: Instrument,
        axes: dict[str, np.ndarray],
        upsample: int,
        structure: ArrayStructure,
        **kwargs: Any,
    ) -> None:
        super().__init__(structure, **kwargs)
        self._instrument = instrument
        self._axes = axes
        self._upsample = upsample

    def _read(self, index: tuple[int | slice, ...]) -> np.ndarray:
        axes = list(self._axes.values())
        picks = [selected(item, len(values)) for item, values in zip(index[:3], axes, strict=True)]
        n = int(np.prod([len(p) for p in picks]))
        if n > MAX_SIMULATED_FRAMES:
            raise DataError(
                f"this request would simulate {n} frames; ask for at most {MAX_SIMULATED_FRAMES} "
                "at a time (e.g. one strain slab, or read block by block)"
            )
        n_pix = self._structure.shape[-1]
        if n == 0:
            frames = np.empty((*[len(p) for p in picks], n_pix, n_pix), dtype=np.float32)
        else:
            grids = np.meshgrid(
                *[values[p] for values, p in zip(self._axes.values(), picks, strict=True)], indexing="ij"
            )
            strain, omega, chi = (g.ravel() for g in grids)
            flat = simulate(strain, omega, chi, self._instrument, upsample=self._upsample)
            frames = flat.reshape(*[len(p) for p in picks], n_pix, n_pix)
        keep = tuple(0 if isinstance(item, int) else slice(None) for item in index[:3])
        return frames[keep + index[3:]]


class SimulatedLibraryAdapter(ContainerAdapter):
    """A library file written by ``nanobeam simulate-library``, served as a container.

    Build with :meth:`from_path`, :meth:`from_uris` (``tiled register``) or :meth:`from_catalog`.
    Frames are read from the file only when a client asks for them. A file holding HDF5 external
    links, virtual datasets or external raw storage is refused.
    """

    @classmethod
    def from_path(
        cls, path: str | Path, *, metadata: dict[str, Any] | None = None
    ) -> SimulatedLibraryAdapter:
        path = Path(path).expanduser().resolve()
        info = _inspect_library(path)
        shape, chunks = info.pop("shape"), info.pop("chunks")
        axes = info.pop("axes")
        structure = _frames_structure(shape, chunks)
        frames = LibraryFramesAdapter(
            path,
            structure,
            metadata={"attrs": {"units": "intensity (Laue maximum = 1)"}},
            specs=[Spec("xarray_data_var")],
        )
        attrs = {
            "instrument": info["instrument_json"],
            "scale": info["scale"],
            "max_counts": info["max_counts"],
            "upsample": info["upsample"],
            "nanobeam_bluesky_version": info["version"],
        }
        md = {
            "attrs": attrs,
            "instrument": json.loads(info["instrument_json"]),
            "grid_points": [len(v) for v in axes.values()],
            "scale": info["scale"],
            "max_counts": info["max_counts"],
            "upsample": info["upsample"],
            "normalisation": info["normalisation"],
            "source": f"library file {path.name}",
            **(metadata or {}),
        }
        return cls(_children(frames, axes, shape[-1]), metadata=md, specs=_specs())

    @classmethod
    def from_uris(cls, data_uri: str, **kwargs: Any) -> SimulatedLibraryAdapter:
        return cls.from_path(path_from_uri(data_uri))

    @classmethod
    def from_catalog(
        cls, data_source: DataSource[None], node: Node, /, **parameters: Any
    ) -> SimulatedLibraryAdapter:
        with served_errors("library"):
            check_parameters(parameters, ())
            return cls.from_path(
                path_from_uri(data_source.assets[0].data_uri), metadata=dict(node.metadata_ or {})
            )


class LazyLibraryAdapter(ContainerAdapter):
    """A library that was never written to disk: requested chunks are simulated on demand.

    The grid and frames equal those of ``write_library`` for the same instrument, grid size and
    upsampling. ``scale`` (the library-wide maximum) is not known without simulating all of it, so
    it is ``None``; use the library file when counts must follow the library-wide scale.
    """

    #: Where ``instrument`` names of catalog entries are looked up (set per catalog).
    instrument_dir: ClassVar[str | Path | None] = None
    #: Registration parameters a catalog entry may carry.
    registration_parameters: ClassVar[tuple[str, ...]] = (
        "instrument",
        "grid_points",
        "upsample",
        "max_counts",
    )

    @classmethod
    def from_instrument(
        cls,
        instrument: Instrument | str | dict[str, Any] | None = None,
        *,
        instrument_dir: str | Path | None = None,
        grid_points: int | None = None,
        upsample: int | None = None,
        max_counts: float = 7.0,
        metadata: dict[str, Any] | None = None,
    ) -> LazyLibraryAdapter:
        """Args: an Instrument, an inline config (dict), the name of a config in
        ``instrument_dir`` (never a path; see ``named_instrument``), or None (physics.md's)."""
        instrument = named_instrument(instrument, instrument_dir)
        axes = grid_axes(instrument, grid_points)
        s = instrument.upsample if upsample is None else int(upsample)
        n_pix = instrument.frame_pixels
        shape = (*[len(v) for v in axes.values()], n_pix, n_pix)
        structure = _frames_structure(shape, (1, 1, shape[2], n_pix, n_pix))
        frames = SimulatedFramesAdapter(
            instrument,
            axes,
            s,
            structure,
            metadata={"attrs": {"units": "intensity (Laue maximum = 1)"}},
            specs=[Spec("xarray_data_var")],
        )
        md = {
            "attrs": {
                "instrument": instrument.to_json(),
                "max_counts": max_counts,
                "upsample": s,
                "nanobeam_bluesky_version": __version__,
            },
            "instrument": instrument.to_dict(),
            "grid_points": [len(v) for v in axes.values()],
            "scale": None,
            "max_counts": max_counts,
            "upsample": s,
            "normalisation": "none: noise-free intensities, Laue maximum = 1; library-wide scale "
            "unknown until every frame is simulated",
            "source": "simulated on demand",
            **(metadata or {}),
        }
        return cls(_children(frames, axes, n_pix), metadata=md, specs=_specs())

    @classmethod
    def from_uris(cls, data_uri: str, **kwargs: Any) -> LazyLibraryAdapter:
        """From an instrument config file (YAML/JSON), e.g. through ``tiled register``."""
        instrument = kwargs.pop("instrument", None) or Instrument.load(path_from_uri(data_uri))
        return cls.from_instrument(instrument, instrument_dir=cls.instrument_dir, **kwargs)

    @classmethod
    def from_catalog(
        cls, data_source: DataSource[None], node: Node, /, **parameters: Any
    ) -> LazyLibraryAdapter:
        """The registered config file (the asset), or ``instrument``: a name or an inline config."""
        with served_errors("lazy library"):
            check_parameters(parameters, cls.registration_parameters)
            instrument = parameters.pop("instrument", None)
            if instrument is None and data_source.assets:
                instrument = Instrument.load(path_from_uri(data_source.assets[0].data_uri))
            return cls.from_instrument(
                instrument,
                instrument_dir=cls.instrument_dir,
                metadata=dict(node.metadata_ or {}),
                **parameters,
            )


def _inspect_library(path: Path) -> dict[str, Any]:
    """Check a library file and read everything but the frames; clear LibraryError otherwise."""
    if not path.is_file():
        raise LibraryError(f"no library at {path}; make one with `nanobeam simulate-library --out {path}`")
    try:
        with open_hdf5(path) as h5:
            attrs = dict(h5.attrs)
            check_library_attrs(attrs, path.name)
            frames = h5["frames"]
            shape = tuple(frames.shape)
            chunks = frames.chunks or (1, 1, *shape[2:])
            axes = {name: np.asarray(h5[name][()], dtype=np.float64) for name in PARAMETERS}
    except LibraryError:
        raise
    except (OSError, KeyError) as exc:
        raise LibraryError(f"{path.name} is not a readable library file ({exc}); regenerate it") from exc
    return {
        "shape": shape,
        "chunks": tuple(chunks),
        "axes": axes,
        "instrument_json": str(attrs["instrument"]),
        "scale": float(attrs["scale"]),
        "max_counts": float(attrs["max_counts"]),
        "upsample": int(attrs["upsample"]),
        "version": str(attrs.get("nanobeam_bluesky_version", "")),
        "normalisation": str(attrs.get("normalisation", "")),
    }
