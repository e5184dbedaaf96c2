"""Pictures: simulated frames and (strain, omega, chi) maps.

Matplotlib's object API on an Agg canvas: works headless and never changes the user's backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .physics import PARAMETERS, Instrument, simulate, to_counts

__all__ = ["save_frame_gallery", "save_map_comparison", "save_result_maps"]

LABELS = {"strain": "ε (×10⁻³)", "omega": "ω (deg)", "chi": "χ (deg)", "thickness": "film thickness (Å)"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_frame_gallery(
    out: str | Path,
    instrument: Instrument = Instrument(),
    *,
    max_counts: float = 7.0,
    seed: int = 0,
    n_steps: int = 5,
) -> Path:
    """Sweep each parameter across its range (others at 0); plot noise-free and counted frames."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ("strain", "omega", "chi")
    labels = {"strain": "ε", "omega": "ω (deg)", "chi": "χ (deg)"}
    fig = _figure(2.1 * n_steps, 12.6)
    axes = fig.subplots(6, n_steps)
    rng = np.random.default_rng(seed)
    for p, name in enumerate(names):
        low, high = instrument.parameter_ranges[name]
        values = np.linspace(low, high, n_steps)
        params = np.zeros((3, n_steps))
        params[p] = values
        frames = simulate(params[0], params[1], params[2], instrument)
        counts = to_counts(frames, max_counts, scale=1.0, rng=rng)
        for j in range(n_steps):
            for r, (img, kind) in enumerate(((frames[j], "noise-free"), (counts[j], "counts"))):
                ax = axes[2 * p + r, j]
                ax.imshow(img, cmap="magma", origin="upper", vmin=0, vmax=1 if r == 0 else max_counts)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{labels[name]} = {values[j]:+.4g}\n{kind}", fontsize=8)
    fig.suptitle(
        f"Simulated 64 x 64 frames (columns: 2θ, rows: out of plane); counts at {max_counts:g} max",
        fontsize=10,
    )
    fig.savefig(out, dpi=90)
    return out


def save_map_comparison(
    path: str | Path,
    truth: xr.Dataset,
    results: dict[str, xr.Dataset],
    pixel_um: float,
    title: str,
) -> Path:
    """One figure: a row per parameter (ε, ω, χ), a column for the truth and each method.

    Every row shares one colour scale (the truth's range, padded 10 %), with units; map axes in µm.
    ``truth`` and each result hold ``strain``, ``omega`` and ``chi`` maps of one shape (scan_y, scan_x).
    """
    path = Path(path)
    columns = {"truth": truth, **results}
    n_y, n_x = truth["strain"].shape
    extent = (0, n_x * pixel_um, n_y * pixel_um, 0)
    fig = _figure(3.1 * len(columns) + 1, 8.4)
    axes = fig.subplots(3, len(columns), squeeze=False)
    for r, p in enumerate(PARAMETERS):
        scale = 1e3 if p == "strain" else 1.0
        lo, hi = float(truth[p].min()) * scale, float(truth[p].max()) * scale
        pad = 0.1 * (hi - lo) or 1e-6
        for c, (name, ds) in enumerate(columns.items()):
            ax = axes[r, c]
            im = ax.imshow(
                np.asarray(ds[p].values) * scale,
                cmap="RdBu_r" if p == "strain" else "viridis",
                vmin=lo - pad,
                vmax=hi + pad,
                extent=extent,
                interpolation="nearest",
            )
            if r == 0:
                ax.set_title(name, fontsize=10)
            ax.set_xlabel("x (µm)", fontsize=8)
            ax.set_ylabel("y (µm)", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.85, label=LABELS[p])
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def save_result_maps(path: str | Path, maps: xr.Dataset, title: str = "") -> Path:
    """ε, ω, χ (and the film thickness, where the result has it) maps (top row) and their expected
    errors ``*_err`` (bottom row) of a result, with units and colour bars; points with a
    value-less or warning flag are grey.

    ``maps`` is on the scan grid (``scan_y``, ``scan_x``, coordinates ``x_um``/``y_um`` in µm),
    or along one dimension (a line scan, or frames without positions: plotted against the index).
    """
    path = Path(path)
    shown_parameters = (*PARAMETERS, *(("thickness",) if "thickness" in maps else ()))
    fig = _figure(4.2 * len(shown_parameters), 7.2)
    axes = fig.subplots(2, len(shown_parameters), squeeze=False)
    flags = np.asarray(maps["flag"].values).astype(np.int64) if "flag" in maps else None
    on_grid = maps["strain"].ndim == 2
    extent = None
    if on_grid and "x_um" in maps.coords and "y_um" in maps.coords:
        x, y = np.asarray(maps["x_um"].values), np.asarray(maps["y_um"].values)
        dx = float(np.nanmedian(np.abs(np.diff(x)))) if len(x) > 1 else 1.0
        dy = float(np.nanmedian(np.abs(np.diff(y)))) if len(y) > 1 else 1.0
        extent = (
            float(np.nanmin(x)) - dx / 2,
            float(np.nanmax(x)) + dx / 2,
            float(np.nanmax(y)) + dy / 2,
            float(np.nanmin(y)) - dy / 2,
        )
    for c, p in enumerate(shown_parameters):
        scale = 1e3 if p == "strain" else 1.0
        for r, name in enumerate((p, f"{p}_err")):
            ax = axes[r, c]
            if name not in maps:
                ax.set_axis_off()
                continue
            values = np.asarray(maps[name].values, dtype=np.float64) * scale
            flagged = np.zeros(values.shape, dtype=bool) if flags is None else flags != 0
            label = LABELS[p] if r == 0 else f"error of {LABELS[p]}"
            if on_grid:
                shown = np.ma.masked_array(values, flagged | ~np.isfinite(values))
                cmap = _colormap("RdBu_r" if p == "strain" and r == 0 else "viridis", bad="0.75")
                image = ax.imshow(shown, cmap=cmap, extent=extent, interpolation="nearest")
                ax.set_xlabel("x (µm)" if extent else "scan column", fontsize=8)
                ax.set_ylabel("y (µm)" if extent else "scan row", fontsize=8)
                fig.colorbar(image, ax=ax, shrink=0.85, label=label)
            else:
                index = np.arange(values.size)
                ax.plot(index[~flagged], values[~flagged], ".", ms=2, label="unflagged")
                if flagged.any():
                    ax.plot(index[flagged], values[flagged], ".", ms=2, color="0.6", label="flagged")
                    ax.legend(fontsize=7)
                ax.set_xlabel("point", fontsize=8)
                ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
    n_flagged = 0 if flags is None else int(np.count_nonzero(flags))
    fig.suptitle(
        f"{title} ({n_flagged} of {flags.size if flags is not None else 0} points flagged: grey)", fontsize=11
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def _colormap(name: str, bad: str) -> Any:
    """A named colormap drawing masked points in ``bad`` (a new one: matplotlib's own is unchanged)."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=bad)
