"""Building blocks shared by the adapters: index handling, registration parameters, array nodes."""

from __future__ import annotations

from typing import Any

import numpy as np
from tiled.adapters.array import ArrayAdapter
from tiled.adapters.core import Adapter
from tiled.adapters.mapping import MapAdapter
from tiled.ndslice import NDBlock, NDSlice
from tiled.structures.array import ArrayStructure
from tiled.structures.core import Spec, StructureFamily

from .._errors import DataError
from .._http import served_errors

__all__ = [
    "BlockwiseArrayAdapter",
    "ContainerAdapter",
    "check_parameters",
    "coordinate",
    "normalise_index",
]


def check_parameters(given: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse registration parameters an adapter does not take (one line naming them)."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise DataError(f"unknown registration parameter(s) {unknown}; this node takes {list(allowed)}")


def normalise_index(index: Any, shape: tuple[int, ...]) -> tuple[int | slice, ...]:
    """Expand an NDSlice / tuple / None to one int or slice per dimension (ints made >= 0)."""
    if index is None:
        items: tuple[Any, ...] = ()
    elif isinstance(index, tuple):
        items = tuple(index)
    else:
        items = (index,)
    n_ellipsis = sum(1 for item in items if item is Ellipsis)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if n_ellipsis:
        at = items.index(Ellipsis)
        fill = len(shape) - (len(items) - 1)
        items = items[:at] + (slice(None),) * fill + items[at + 1 :]
    if len(items) > len(shape):
        raise IndexError(f"too many indices ({len(items)}) for an array of shape {shape}")
    items = items + (slice(None),) * (len(shape) - len(items))
    out: list[int | slice] = []
    for item, n in zip(items, shape, strict=True):
        if isinstance(item, (int, np.integer)):
            i = int(item)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
            out.append(i % n)
        elif isinstance(item, slice):
            out.append(item)
        else:
            raise IndexError(f"unsupported index {item!r}: use integers and slices")
    return tuple(out)


def selected(item: int | slice, n: int) -> np.ndarray:
    """The positions along an axis of size ``n`` that ``item`` selects (1-D, even for an int)."""
    return np.atleast_1d(np.arange(n)[item])


def h5_read(dataset: Any, index: tuple[int | slice, ...]) -> np.ndarray:
    """Read ``dataset[index]`` from an h5py dataset, also for negative steps and empty slices."""
    region: list[int | slice] = []
    rest: list[slice] = []
    out_shape: list[int] = []
    for item, n in zip(index, dataset.shape, strict=True):
        if isinstance(item, int):
            region.append(item)
            continue
        r = range(*item.indices(n))
        out_shape.append(len(r))
        if len(r) == 0:
            region.append(slice(0, 0))
            rest.append(slice(None))
        elif r.step > 0:
            region.append(slice(r.start, r.stop, r.step))
            rest.append(slice(None))
        else:
            region.append(slice(r[-1], r[0] + 1))
            rest.append(slice(None, None, r.step))
    if 0 in out_shape:
        return np.empty(out_shape, dtype=dataset.dtype)
    return np.asarray(dataset[tuple(region)])[tuple(rest)]


class BlockwiseArrayAdapter(Adapter[ArrayStructure]):
    """An array node that computes any requested region (subclasses implement ``_read``).

    ``read`` takes any basic index; ``read_block`` maps a chunk index to its region first.
    Errors become HTTP errors with the message intact (``nanobeam_bluesky.tiled._http``).
    """

    structure_family = StructureFamily.array
    #: Name used in error messages.
    label: str = "array"

    def __init__(
        self,
        structure: ArrayStructure,
        *,
        metadata: dict[str, Any] | None = None,
        specs: list[Spec] | None = None,
    ) -> None:
        super().__init__(structure, metadata=metadata, specs=specs)

    @property
    def dims(self) -> tuple[str, ...] | None:
        return self._structure.dims

    def _read(self, index: tuple[int | slice, ...]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def read(self, slice: Any = NDSlice(...)) -> np.ndarray:
        with served_errors(self.label):
            index = normalise_index(slice, tuple(self._structure.shape))
            return self._read(index)

    def read_block(self, block: Any, slice: Any = NDSlice(...)) -> np.ndarray:
        block = block if isinstance(block, NDBlock) else NDBlock(*block)
        region = block.slice_from_chunks(self._structure.chunks)
        array = self.read(region)
        return array[tuple(slice)] if slice else array


def coordinate(
    values: np.ndarray, dims: tuple[str, ...], units: str | None = None, **attrs: Any
) -> ArrayAdapter:
    """A coordinate array node in the xarray_dataset convention (``attrs`` carry the units)."""
    attrs = {**({"units": units} if units else {}), **attrs}
    return ArrayAdapter.from_array(
        np.asarray(values), dims=dims, metadata={"attrs": attrs}, specs=[Spec("xarray_coord")]
    )


class ContainerAdapter(MapAdapter):
    """A fixed set of child nodes, described inline (one request lists them all)."""

    def inlined_contents_enabled(self, depth: int) -> bool:
        return True
