"""Live ε/ω/χ maps of a derived run, drawn with matplotlib as rows arrive (in the spirit of LiveGrid)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from event_model import DocumentRouter
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._schema import UNITS
from ..errors import InputError

__all__ = ["LiveStrainMaps", "MapGrid"]

logger = logging.getLogger(__name__)

_LABELS = {"strain": "strain ε", "omega": "ω", "chi": "χ"}


class MapGrid:
    """Where a row goes on the map: from its positions and the scan's shape/extents, or its order.

    Args:
        shape: (ny, nx) of the map.
        extents: ((y_first, y_last), (x_first, x_last)) in position units, or None to place rows
            in raster order (row-major, by raw seq_num).
        keys: (y_key, x_key), the position keys of the rows (needed with ``extents``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        extents: Sequence[Sequence[float]] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise InputError(f"a map needs a 2-D shape (ny, nx), got {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.extents: np.ndarray | None = None
        self.keys: tuple[str, ...] | None = None
        if extents is not None and keys is not None:
            self.extents = np.asarray(extents, dtype=float)
            self.keys = tuple(keys)

    @classmethod
    def from_start(cls, start: Mapping[str, Any], stream: str = "primary") -> MapGrid | None:
        """From a (derived) start document's ``shape``, ``extents`` and ``hints.dimensions``."""
        shape = start.get("shape")
        if shape is None or len(shape) != 2:
            return None
        dims = [
            d for d in (start.get("hints") or {}).get("dimensions") or [] if len(d) == 2 and d[1] == stream
        ]
        keys = [d[0][0] if not isinstance(d[0], str) else d[0] for d in dims]
        extents = start.get("extents")
        if len(keys) == 2 and extents is not None and len(extents) == 2:
            return cls(shape, extents, keys)
        return cls(shape)

    def cells(
        self, data: Mapping[str, Sequence[float]], seq_nums: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) indices of each row; -1 where it falls outside the map."""
        ny, nx = self.shape
        if self.extents is not None and self.keys is not None and all(k in data for k in self.keys):
            idx = []
            for axis, key in enumerate(self.keys):
                lo, hi = self.extents[axis]
                n = self.shape[axis]
                v = np.asarray(data[key], dtype=float)
                with np.errstate(invalid="ignore"):
                    i = np.rint((v - lo) / (hi - lo) * (n - 1)) if hi != lo else np.zeros_like(v)
                i = np.where(np.isfinite(i), i, -1).astype(int)
                idx.append(np.where((i >= 0) & (i < n), i, -1))
            row, col = idx
        else:
            flat = np.asarray(seq_nums, dtype=int) - 1
            row, col = flat // nx, flat % nx
            row = np.where((flat >= 0) & (row < ny), row, -1)
        ok = (row >= 0) & (col >= 0)
        return np.where(ok, row, -1), np.where(ok, col, -1)


class LiveStrainMaps(DocumentRouter):
    """Draws the strain, ω and χ maps of a derived run as its rows arrive; saves a PNG at stop.

    Subscribe it to a :class:`NanobeamCallback` (``callback.subscribe(maps)``). It uses
    matplotlib's object API on an Agg canvas, so it runs headless and from any thread; give
    ``figure`` to draw into your own (e.g. interactive) figure instead.

    Args:
        directory: where ``<scan_id or uid>-nanobeam-maps.png`` is written at stop (None: no file).
        shape: (ny, nx) of the map; None takes the start document's ``shape``.
        fields: the derived keys to map.
        redraw_period_s: shortest time between redraws while rows arrive.
        figure: a matplotlib Figure to draw into.
        show_flagged: also draw rows that carry a quality flag (by default they are grey, like
            the points not yet measured, and counted in the title: their numbers are not to be
            trusted).
    """

    def __init__(
        self,
        directory: str | Path | None = "nanobeam-output",
        *,
        shape: Sequence[int] | None = None,
        fields: Sequence[str] = ("strain", "omega", "chi"),
        redraw_period_s: float = 0.5,
        figure: Figure | None = None,
        show_flagged: bool = False,
    ) -> None:
        super().__init__()
        self.directory = None if directory is None else Path(directory)
        self.shape = shape
        self.fields = tuple(fields)
        self.redraw_period_s = redraw_period_s
        self.show_flagged = show_flagged
        #: Rows of the current run that carried a flag.
        self.flagged = 0
        self.figure = (
            figure
            if figure is not None
            else Figure(figsize=(4.4 * len(self.fields), 4.0), layout="constrained")
        )
        if figure is None:
            FigureCanvasAgg(self.figure)
        self.maps: dict[str, np.ndarray] = {}
        self.saved: list[Path] = []
        self._grid: MapGrid | None = None
        self._images: dict[str, Any] = {}
        self._start: Mapping[str, Any] | None = None
        self._descriptors: set[str] = set()
        self._last_draw = 0.0
        self._title = ""
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- documents
    def start(self, doc):
        with self._lock:
            self._start = doc
            self._descriptors.clear()
            grid = MapGrid(self.shape) if self.shape is not None else MapGrid.from_start(doc)
            self._grid = grid
            self.maps = {}
            self.flagged = 0
            if grid is not None:
                self.maps = {f: np.full(grid.shape, np.nan) for f in self.fields}
                self._setup_axes(doc)

    def descriptor(self, doc):
        if doc.get("name", "primary") == "primary":
            self._descriptors.add(doc["uid"])

    def event_page(self, doc):
        if self._grid is None or doc["descriptor"] not in self._descriptors:
            return
        data = doc["data"]
        with self._lock:
            row, col = self._grid.cells(data, data.get("raw_seq_num", doc["seq_num"]))
            ok = row >= 0
            flagged = np.asarray(data["flag"]) != 0 if "flag" in data else np.zeros(len(row), bool)
            self.flagged += int(flagged.sum())
            for f in self.fields:
                if f in data:
                    values = np.asarray(data[f], dtype=float)
                    if not self.show_flagged:
                        values = np.where(flagged, np.nan, values)
                    self.maps[f][row[ok], col[ok]] = values[ok]
            if time.monotonic() - self._last_draw >= self.redraw_period_s:
                self._draw()

    def stop(self, doc):
        with self._lock:
            if self._grid is None or self._start is None:
                return
            self._draw()
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                label = self._start.get("scan_id") or self._start["uid"][:8]
                path = self.directory / f"{label}-{self._start['uid'][:8]}-nanobeam-maps.png"
                self.figure.savefig(path, dpi=100)
                self.saved.append(path)
                logger.info("saved live maps to %s", path)

    # ---------------------------------------------------------------- drawing
    def _setup_axes(self, start: Mapping[str, Any]) -> None:
        assert self._grid is not None
        self.figure.clear()
        axes = self.figure.subplots(1, len(self.fields), squeeze=False)[0]
        extent = None
        xlabel, ylabel = "column", "row"
        if self._grid.extents is not None and self._grid.keys is not None:
            (y0, y1), (x0, x1) = self._grid.extents
            dy = (y1 - y0) / max(self._grid.shape[0] - 1, 1) / 2
            dx = (x1 - x0) / max(self._grid.shape[1] - 1, 1) / 2
            extent = (x0 - dx, x1 + dx, y1 + dy, y0 - dy)
            ylabel, xlabel = self._grid.keys
        self._images = {}
        for ax, f in zip(axes, self.fields, strict=True):
            base = f.removesuffix("_std").removesuffix("_err")
            image = ax.imshow(
                self.maps[f],
                extent=extent,
                interpolation="nearest",
                cmap=colormaps["viridis"].with_extremes(bad="0.85"),
            )
            unit = UNITS.get(base, "")
            what = {"_std": " std", "_err": " expected error"}.get(f[len(base) :], "")
            ax.set_title(f"{_LABELS.get(base, base)}{what}{f' ({unit})' if unit not in ('', '1') else ''}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            self.figure.colorbar(image, ax=ax, shrink=0.8)
            self._images[f] = image
        parent = start.get("parent_uid", "")
        model = (start.get("nanobeam") or {}).get("model_id", "")
        self._title = f"scan {start.get('scan_id', '?')} ({parent[:8]}), model {model}"
        self.figure.suptitle(self._title, fontsize=9)

    def _draw(self) -> None:
        for f, image in self._images.items():
            values = self.maps[f]
            image.set_data(np.ma.masked_invalid(values))
            finite = values[np.isfinite(values)]
            if finite.size:
                lo, hi = float(finite.min()), float(finite.max())
                image.set_clim(lo, hi if hi > lo else lo + 1e-12)
        if self.flagged and not self.show_flagged:
            self.figure.suptitle(f"{self._title}; {self.flagged} flagged points in grey", fontsize=9)
        self.figure.canvas.draw_idle()
        self._last_draw = time.monotonic()
