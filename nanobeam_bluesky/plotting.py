"""Pictures: simulated frames and (strain, omega, chi) maps. Matplotlib, Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .physics import Instrument, simulate, to_counts

__all__ = ["save_frame_gallery"]


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
    fig, axes = plt.subplots(6, n_steps, figsize=(2.1 * n_steps, 12.6), constrained_layout=True)
    rng = np.random.default_rng(seed)
    for p, name in enumerate(names):
        low, high = instrument.parameter_ranges[name]
        values = np.linspace(low, high, n_steps)
        params = np.zeros((3, n_steps))
        params[p] = values
        frames = simulate(*params, instrument)
        counts = to_counts(frames, max_counts, scale=1.0, rng=rng)
        for j in range(n_steps):
            for r, (img, kind) in enumerate(((frames[j], "noise-free"), (counts[j], "counts"))):
                ax = axes[2 * p + r, j]
                ax.imshow(img, cmap="magma", origin="upper", vmin=0,
                          vmax=1 if r == 0 else max_counts)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{labels[name]} = {values[j]:+.4g}\n{kind}", fontsize=8)
    fig.suptitle(
        f"Simulated 64 x 64 frames (columns: 2θ, rows: out of plane); counts at {max_counts:g} max",
        fontsize=10,
    )
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
