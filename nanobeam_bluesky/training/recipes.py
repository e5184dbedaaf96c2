"""Training recipes: the published one, reproducible as such, and our default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InputError

__all__ = ["DEFAULT_RECIPE", "PAPER_RECIPE", "RECIPES", "REGISTERED_RECIPE", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    """Everything that defines how one ensemble member is trained.

    Counts: frames are scaled so the library-wide maximum intensity (1, the Laue maximum of a
    fully lit pixel) has ``max_counts`` expected counts, then Poisson noise is drawn.
    """

    name: str
    architecture: str
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    #: "grid": the 41^3 library split 80/10/10 (noise drawn once); "on_the_fly": random
    #: off-grid parameters, simulated into a pool that is partly regenerated every epoch.
    data: Literal["grid", "on_the_fly"] = "on_the_fly"
    max_counts: float = 7.0
    #: Count level factors (low, high) drawn log-uniformly per frame; (1, 1) = none.
    count_augmentation: tuple[float, float] = (1.0, 1.0)
    #: Fresh Poisson noise every time a frame is seen (else drawn once per frame).
    fresh_noise: bool = True
    batch_size: int = 64
    learning_rate: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = 0
    epochs: int = 500
    #: On-the-fly: frames presented per epoch.
    frames_per_epoch: int = 500_000
    #: Stop when validation has not improved for this many epochs (None: never).
    early_stopping_patience: int | None = None
    #: Early stopping counts only epochs from this fraction of ``epochs`` on: at a high learning
    #: rate the validation loss jumps by 2x from epoch to epoch, and a streak of bad epochs there
    #: says nothing about convergence (it stopped 30-epoch members at epochs 10 and 14).
    early_stopping_from: float = 0.0
    #: "equal": MSE on range-standardised outputs; "crlb": each parameter weighted by
    #: (range / Cramer-Rao bound)^2, so each is learnt to the same fraction of its physical limit.
    loss_weights: Literal["equal", "crlb"] = "equal"
    pool_size: int = 200_000
    pool_refresh_fraction: float = 0.1
    validation_frames: int = 4096
    grid_points: int = 41
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    #: Sub-pixels per binned pixel for the training frames (None: the instrument's).
    upsample: int | None = None
    #: Refining stage only: std (omega, chi, degrees) of the coarse estimate's error simulated
    #: in training, about twice the shipped coarse ensemble's RMSE (2.8e-4, 6.5e-4 deg).
    registration_jitter_deg: tuple[float, float] = (5e-4, 1.2e-3)
    #: Refining stage only: the refiner predicts strain too, from a copy of the frame registered
    #: on the band (see ``models.registered``); off, strain is the coarse ensemble's.
    refine_strain: bool = False
    #: Refining stage only: std of the coarse strain's error simulated in training (about twice
    #: the seed instrument's coarse RMSE, 1.5e-4).
    registration_jitter_strain: float = 3e-4
    #: Real films and detectors (on-the-fly data only; 0 = off, the shipped recipes' setting so
    #: far). Each frame's film thickness is drawn uniformly within ± this fraction of the
    #: instrument's (0.35: 76-158 Å for the seed's 117 Å film).
    thickness_spread: float = 0.0
    #: A flat background added to each frame's expected counts, uniform in [0, this] counts per
    #: binned pixel.
    background_max: float = 0.0
    #: The fraction of frames given a random detector mask (a dead band of 1-2 rows or columns,
    #: up to 4 dead pixels), filled from the unmasked neighbours exactly as ``predict()`` fills a
    #: declared mask, so the network learns the frames it will be shown.
    mask_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.thickness_spread < 1.0:
            raise InputError(f"thickness_spread must be in [0, 1), got {self.thickness_spread}")
        if self.background_max < 0:
            raise InputError(f"background_max must be >= 0 counts per pixel, got {self.background_max}")
        if not 0.0 <= self.mask_fraction <= 1.0:
            raise InputError(f"mask_fraction must be in [0, 1], got {self.mask_fraction}")
        departures = self.thickness_spread or self.background_max or self.mask_fraction
        if departures and self.data != "on_the_fly":
            raise InputError(
                "thickness_spread, background_max and mask_fraction need data='on_the_fly' (the grid "
                "recipe draws its noise once)"
            )

    def replace(self, **changes: Any) -> Recipe:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InputError(f"unknown recipe field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The published recipe: 41^3 grid, library-wide scale to 7 counts then Poisson once, random
#: 80/10/10 split, Adam lr 1e-4, MSE, batch 64, 500 epochs, best validation checkpoint kept.
PAPER_RECIPE = Recipe(
    name="paper",
    architecture="paper",
    data="grid",
    fresh_noise=False,
    batch_size=64,
    learning_rate=1e-4,
    lr_schedule="constant",
    epochs=500,
)

#: Ours: continuous parameters, fresh noise, count level x0.5..x3, cosine schedule with warm-up,
#: early stopping, CRLB-weighted loss, and the CPU-efficient dense network. Real films and
#: detectors: each frame's film within ±35 % of the instrument's (the thickness is a fourth output),
#: a flat background of 0-0.12 counts per binned pixel, and a third of the frames masked.
DEFAULT_RECIPE = Recipe(
    name="default",
    architecture="mlp",
    architecture_kwargs={"hidden": (256, 256)},
    data="on_the_fly",
    count_augmentation=(0.5, 3.0),
    fresh_noise=True,
    batch_size=256,
    learning_rate=1e-3,
    lr_schedule="cosine",
    warmup_epochs=1,
    epochs=40,
    frames_per_epoch=500_000,
    early_stopping_patience=6,
    early_stopping_from=0.5,
    loss_weights="crlb",
    pool_size=200_000,
    pool_refresh_fraction=0.1,
    thickness_spread=0.35,
    background_max=0.12,
    mask_fraction=0.3,
)

#: The refining stage (``nanobeam train --recipe registered --base COARSE.pt``): the default
#: recipe on frames shifted by whole pixels to a coarse tilt estimate, predicting the sub-pixel
#: residual of omega and chi. It learns fast: 1.2x the Cramer-Rao bound after 2 epochs.
#: Strain is refined only when asked (``--refine strain``): on the example instrument's 250 A film
#: it took the networks' strain from 2.08 to 1.64x the bound at 60 min, but on the default
#: instrument at the shipped sizes (3 epochs x 300,000 frames) it was worse in every parameter
#: (strain 1.87 vs 1.77x, omega 1.23 vs 1.16x, chi 1.36 vs 1.24x): the wider input learns slower.
REGISTERED_RECIPE = DEFAULT_RECIPE.replace(name="registered", architecture="registered_mlp", epochs=10)

RECIPES = {"paper": PAPER_RECIPE, "default": DEFAULT_RECIPE, "registered": REGISTERED_RECIPE}
