"""Training data: noise-free simulated frames with labels, and the noise drawn from them.

Two sources, one interface (``batches`` and ``validation``):

* :class:`GridData`: the published 41^3 grid library, split 80/10/10 at random.
* :class:`OnTheFlyData`: random off-grid parameters simulated into a pool; every epoch one block
  of the pool is re-simulated with new parameters, so a long run sees millions of distinct frames.

Labels are standardised: (theta - centre) / half_range, per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..inference import inpaint_tensor
from ..physics import PARAMETERS, Instrument, binned_instrument_mask, open_library, simulate, simulate_tensor
from ..quality import KERNEL_LOCK
from ._kernels import detector_masks, fill_masked, poisson_counts
from .recipes import Recipe

__all__ = [
    "GridData",
    "OnTheFlyData",
    "Standardiser",
    "instrument_mask",
    "make_data",
    "masked_like_predict",
    "noisy_counts",
    "random_detector_masks",
    "random_parameters",
    "thickness_box",
]

#: A progress bar over an iterable, called like ``tqdm(iterable, desc=..., leave=...)``.
Progress = Callable[..., Iterable[int]]


@dataclass(frozen=True)
class Standardiser:
    """Maps (strain, omega_deg, chi_deg) to [-1, 1] over the instrument's parameter box."""

    centre: tuple[float, float, float]
    half_range: tuple[float, float, float]

    @classmethod
    def for_instrument(cls, instrument: Instrument) -> Standardiser:
        (s_lo, s_hi), (o_lo, o_hi), (c_lo, c_hi) = instrument.parameter_ranges.values()
        return cls(
            centre=((s_lo + s_hi) / 2, (o_lo + o_hi) / 2, (c_lo + c_hi) / 2),
            half_range=((s_hi - s_lo) / 2, (o_hi - o_lo) / 2, (c_hi - c_lo) / 2),
        )

    def forward(self, params: np.ndarray) -> np.ndarray:
        return (params - np.asarray(self.centre)) / np.asarray(self.half_range)

    def inverse(self, standardised: np.ndarray) -> np.ndarray:
        return standardised * np.asarray(self.half_range) + np.asarray(self.centre)


def thickness_box(instrument: Instrument, spread: float) -> tuple[float, float]:
    """(centre, half range) in Å of the film thicknesses a recipe with ``thickness_spread``
    draws: the instrument's film ± that fraction. How a thickness output is standardised."""
    nominal = instrument.film_thickness_angstrom
    return nominal, nominal * spread


def random_parameters(instrument: Instrument, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) parameters uniform over the instrument's box: strain, omega_deg, chi_deg."""
    ranges = list(instrument.parameter_ranges.values())
    return np.stack([rng.uniform(lo, hi, n) for lo, hi in ranges], axis=1)


#: Draw the noise and fill the masks with the compiled kernels (``_kernels.py``) when the frames
#: are on the CPU. False runs on the CPU the tensor code a GPU runs: the tests' way to exercise it.
COMPILED_ON_CPU = True


def _compiled(device: torch.device | str) -> bool:
    return COMPILED_ON_CPU and torch.device(device).type == "cpu"


def noisy_counts(
    noise_free: torch.Tensor,
    max_counts: float,
    augmentation: tuple[float, float],
    generator: torch.Generator,
    background_max: float = 0.0,
) -> torch.Tensor:
    """Poisson counts of ``max_counts * level * frame + b``, level log-uniform in
    ``augmentation``, the flat background b uniform in [0, ``background_max``] counts per pixel."""
    n, device = len(noise_free), noise_free.device
    scale = torch.full((n, 1, 1), float(max_counts), device=device)
    low, high = augmentation
    if high > low:
        u = torch.rand((n, 1, 1), generator=generator, device=device)
        scale = scale * torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    elif low != 1.0:
        scale = scale * low
    background = torch.zeros((n, 1, 1), device=device)
    if background_max > 0:  # drawn only when asked: the noise of recipes without it is unchanged
        background = background_max * torch.rand((n, 1, 1), generator=generator, device=device)
    if not _compiled(device):
        return torch.poisson(noise_free.float() * scale + background, generator=generator)
    # On the CPU the compiled sampler (_kernels.py): 19 -> 9 ms a batch of 256 on 2 cores, its
    # streams keyed by one seed from the caller's generator, so results stay reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    frames = noise_free.float().reshape(n, -1).contiguous()
    out = torch.empty_like(frames)
    with KERNEL_LOCK:
        poisson_counts(
            frames.numpy(),
            scale.double().flatten().numpy(),
            background.double().flatten().numpy(),
            seed,
            out.numpy(),
        )
    return out.view(noise_free.shape)


def random_detector_masks(
    n: int, pixels: int, fraction: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n, F, F) bool masks, True = masked: a ``fraction`` of the frames get a dead band of 1-2
    whole rows or columns (a module gap) and up to 4 dead pixels at random; the rest none."""
    draws = torch.rand((n, 8), generator=generator, device=device)
    if _compiled(device):
        masks = torch.empty((n, pixels, pixels), dtype=torch.bool)
        with KERNEL_LOCK:
            detector_masks(draws.double().numpy(), fraction, pixels, masks.numpy())
        return masks
    return masks_from_draws(draws, fraction, pixels)


def masks_from_draws(draws: torch.Tensor, fraction: float, pixels: int) -> torch.Tensor:
    """:func:`random_detector_masks` from its (n, 8) uniform draws, as tensor operations on their
    device (the reference the compiled CPU kernel is tested against)."""
    masks = torch.zeros((len(draws), pixels, pixels), dtype=torch.bool, device=draws.device)
    chosen = torch.nonzero(draws[:, 0] < fraction).flatten().tolist()
    for i in chosen:
        u = draws[i].tolist()
        width = 1 + int(u[1] < 0.5)
        start = int(u[2] * (pixels - width + 1))
        if u[3] < 0.5:
            masks[i, start : start + width, :] = True
        else:
            masks[i, :, start : start + width] = True
        for k in range(int(u[4] * 5)):  # 0-4 dead pixels, placed from the remaining draws
            row = int(((u[5] + 0.37 * k) % 1.0) * pixels)
            col = int(((u[6] + 0.61 * k) % 1.0) * pixels)
            masks[i, row, col] = True
    return masks


def masked_like_predict(
    counts: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    fixed: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Counts with random detector masks (:func:`random_detector_masks`) zeroed and filled from
    the unmasked neighbours, as ``predict()`` fills a declared mask before the networks.

    ``fixed``: (F, F) bool, pixels masked in every frame (the instrument's declared mask, which
    ``predict()`` fills in every frame it is shown).
    """
    if fraction <= 0 and fixed is None:
        return counts
    masks = random_detector_masks(len(counts), counts.shape[-1], fraction, generator, counts.device)
    if fixed is not None:
        masks |= torch.as_tensor(fixed, dtype=torch.bool, device=counts.device)
    chosen = torch.nonzero(masks.flatten(1).any(1)).flatten()
    if not len(chosen):
        return counts
    if _compiled(counts.device):  # compiled, visiting only the masked pixels: 13 -> 1 ms a batch
        out = torch.empty_like(counts, dtype=torch.float32)
        with KERNEL_LOCK:
            fill_masked(counts.float().contiguous().numpy(), masks.numpy(), out.numpy())
        return out
    return fill_masked_frames(counts, masks, chosen)


def instrument_mask(instrument: Instrument) -> torch.Tensor | None:
    """The instrument's declared dead pixels, binned (F, F) bool, or None: the training frames
    carry them in every frame, filled, as ``predict()`` will show them to the networks."""
    mask = binned_instrument_mask(instrument)
    return None if mask is None else torch.as_tensor(np.array(mask))


def fill_masked_frames(counts: torch.Tensor, masks: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The tensor path of :func:`masked_like_predict` (any device): the ``chosen`` frames, those a
    mask hit, zeroed under their masks and filled by ``inpaint_tensor``; the others unchanged."""
    out = counts.clone()
    picked = masks[chosen]
    out[chosen] = inpaint_tensor(torch.where(picked, torch.zeros_like(out[chosen]), out[chosen]), picked)
    return out


class _Data:
    """Shared batching over noise-free frames (float16) or fixed counts (uint8)."""

    frames: torch.Tensor  # (N, F, F) noise-free (float16) or counts (uint8)
    labels: torch.Tensor  # (N, 3) standardised
    train_index: torch.Tensor
    fixed_counts: bool
    recipe: Recipe
    #: The instrument's declared dead pixels (F, F), filled in every frame; None: none declared.
    fixed_mask: torch.Tensor | None = None

    def batches(
        self, epoch: int, generators: tuple[torch.Generator, torch.Generator], device: str
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (counts (B, F, F), standardised labels (B, 3)) on ``device`` for one epoch.

        ``generators``: (CPU generator for the order, device generator for the noise).
        """
        recipe = self.recipe
        generator, noise_generator = generators
        n = len(self.train_index)
        per_epoch = n if isinstance(self, GridData) else recipe.frames_per_epoch
        order = torch.cat(
            [self.train_index[torch.randperm(n, generator=generator)] for _ in range(-(-per_epoch // n))]
        )[:per_epoch]
        for start in range(0, per_epoch, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            x = self.frames[idx.to(self.frames.device)].to(device)
            if self.fixed_counts:
                x = x.float()
            else:
                x = noisy_counts(
                    x, recipe.max_counts, recipe.count_augmentation, noise_generator, recipe.background_max
                )
            # random masks need on-the-fly data (Recipe refuses them otherwise); the declared ones: all
            x = masked_like_predict(x, recipe.mask_fraction, noise_generator, self.fixed_mask)
            yield x, self.labels[idx].to(device)

    def steps_per_epoch(self) -> int:
        n = len(self.train_index) if isinstance(self, GridData) else self.recipe.frames_per_epoch
        return -(-n // self.recipe.batch_size)


class GridData(_Data):
    """The grid library, split at random into train / validation / test (seeded)."""

    def __init__(
        self,
        instrument: Instrument,
        recipe: Recipe,
        seed: int,
        library: str | None = None,
    ) -> None:
        self.recipe = recipe
        self.fixed_mask = instrument_mask(instrument)
        std = Standardiser.for_instrument(instrument)
        if library is not None:
            ds = open_library(library)
            noise_free = ds["frames"].values.reshape(-1, *ds["frames"].shape[-2:])
            axes = [ds[name].values for name in PARAMETERS]
            scale = ds.attrs["scale"]
            ds.close()
        else:
            from ..physics import grid_axes, iter_grid

            axes = list(grid_axes(instrument, recipe.grid_points).values())
            slabs = iter_grid(axes[0], axes[1], axes[2], instrument, upsample=recipe.upsample)
            noise_free = np.concatenate([slab.reshape(-1, *slab.shape[-2:]) for _, slab in slabs])
            scale = float(noise_free.max())
        params = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)
        self.labels = torch.as_tensor(std.forward(params), dtype=torch.float32)
        self.params = params
        rng = np.random.default_rng([seed, 0])
        noise_free = noise_free / scale  # library-wide scale: max intensity -> max_counts
        self.fixed_counts = not recipe.fresh_noise
        if self.fixed_counts:
            counts = rng.poisson(noise_free * recipe.max_counts)
            self.frames = torch.as_tensor(np.minimum(counts, 255).astype(np.uint8))
        else:
            self.frames = torch.as_tensor(noise_free.astype(np.float16))
        # The split is a property of the dataset, shared by every ensemble member.
        order = np.random.default_rng(0).permutation(len(params))
        n_train = round(recipe.split[0] * len(params))
        n_val = round(recipe.split[1] * len(params))
        self.train_index = torch.as_tensor(order[:n_train])
        self.val_index = torch.as_tensor(order[n_train : n_train + n_val])
        self.test_index = torch.as_tensor(order[n_train + n_val :])
        self._noise_rng = rng

    def _held_out(self, index: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        x = self.frames[index]
        if not self.fixed_counts:
            x = torch.as_tensor(self._noise_rng.poisson(x.float().numpy() * self.recipe.max_counts))
        x = x.float()
        if self.fixed_mask is not None:
            x = masked_like_predict(x, 0.0, torch.Generator(), self.fixed_mask)
        return x, self.params[index.numpy()]

    def validation(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._held_out(self.val_index)

    def test(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._held_out(self.test_index)

    def prepare(self, epoch: int) -> None:
        """Nothing changes between epochs for a fixed library."""


class OnTheFlyData(_Data):
    """A pool of off-grid frames; block (epoch - 1) mod B is re-simulated at each epoch >= 1.

    Every block's content is a function of (seed, block, epoch of generation) only, so training
    resumed from a checkpoint sees exactly the frames an uninterrupted run would. With ``device``
    a GPU, the pool is simulated and kept there: the CPU no longer sets the pace.
    """

    def __init__(
        self,
        instrument: Instrument,
        recipe: Recipe,
        seed: int,
        progress: Progress | None = None,
        device: str = "cpu",
    ) -> None:
        self.instrument = instrument
        self.recipe = recipe
        self.fixed_mask = instrument_mask(instrument)
        self.seed = seed
        self.std = Standardiser.for_instrument(instrument)
        self.n_blocks = max(1, round(1 / recipe.pool_refresh_fraction))
        self.block_size = recipe.pool_size // self.n_blocks
        n_pix = instrument.frame_pixels
        self.device = torch.device(device)
        self.frames = torch.empty(
            (self.n_blocks * self.block_size, n_pix, n_pix), dtype=torch.float16, device=self.device
        )
        # (strain, omega, chi), then the film thickness when the recipe draws it
        n_labels = 4 if recipe.thickness_spread > 0 else 3
        self.labels = torch.empty((self.n_blocks * self.block_size, n_labels), dtype=torch.float32)
        self.train_index = torch.arange(len(self.frames))
        self.fixed_counts = False
        self._epoch: int | None = None
        self._progress = progress

    def _generate(self, block: int, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, 1, block, epoch])
        params = random_parameters(self.instrument, self.block_size, rng)
        strain, omega, chi = params.T
        thickness = self._thickness(rng, self.block_size)
        frames = simulate_tensor(
            strain,
            omega,
            chi,
            self.instrument,
            upsample=self.recipe.upsample,
            device=self.device,
            thickness_angstrom=thickness,
        )
        sl = slice(block * self.block_size, (block + 1) * self.block_size)
        self.frames[sl] = frames.half()
        self.labels[sl] = torch.as_tensor(self._standardised(params, thickness), dtype=torch.float32)

    def _standardised(self, params: np.ndarray, thickness: np.ndarray | None) -> np.ndarray:
        """Labels: the box-standardised (strain, omega, chi), and the thickness if drawn."""
        labels = self.std.forward(params)
        if thickness is None:
            return labels
        centre, half = thickness_box(self.instrument, self.recipe.thickness_spread)
        return np.concatenate([labels, ((thickness - centre) / half)[:, None]], axis=1)

    def _thickness(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """Each frame's film thickness (Å) within ± ``thickness_spread``; None: the instrument's.
        Drawn after the parameters, so recipes without it keep their frames."""
        spread = self.recipe.thickness_spread
        if spread <= 0:
            return None
        return self.instrument.film_thickness_angstrom * (1 + rng.uniform(-spread, spread, n))

    def _generated_at(self, block: int, epoch: int) -> int:
        """Epoch at which ``block`` was last re-simulated, as of ``epoch`` (0 = initial pool)."""
        if epoch < 1 + block:
            return 0
        return epoch - ((epoch - 1 - block) % self.n_blocks)

    def prepare(self, epoch: int) -> None:
        if self._epoch is None or epoch != self._epoch + 1:
            blocks: Iterable[int] = range(self.n_blocks)
            if self._progress is not None:
                blocks = self._progress(blocks, desc="simulating training pool", leave=False)
            for block in blocks:
                self._generate(block, self._generated_at(block, epoch))
        elif epoch >= 1:
            block = (epoch - 1) % self.n_blocks
            self._generate(block, epoch)
        self._epoch = epoch

    def _held_out(self, salt: int) -> tuple[torch.Tensor, np.ndarray]:
        """Held-out counts and their truth (N, 3), or (N, 4) with the thickness (Å) if drawn."""
        # Shared by all members (no member seed): every member is scored on the same frames.
        rng = np.random.default_rng([12345, salt])
        recipe = self.recipe
        params = random_parameters(self.instrument, recipe.validation_frames, rng)
        strain, omega, chi = params.T
        thickness = self._thickness(rng, len(params))
        frames = simulate(
            strain,
            omega,
            chi,
            self.instrument,
            upsample=recipe.upsample,
            thickness_angstrom=thickness,
        )
        expected = frames * recipe.max_counts
        if recipe.background_max > 0:  # held-out frames carry the same departures as training
            expected = expected + rng.uniform(0, recipe.background_max, (len(params), 1, 1))
        counts = torch.as_tensor(rng.poisson(expected).astype(np.float32))
        if recipe.mask_fraction > 0 or self.fixed_mask is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            counts = masked_like_predict(counts, recipe.mask_fraction, generator, self.fixed_mask)
        if thickness is not None:
            params = np.concatenate([params, thickness[:, None]], axis=1)
        return counts, params

    def validation(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._held_out(2)

    def test(self) -> tuple[torch.Tensor, np.ndarray]:
        return self._held_out(3)


def make_data(
    instrument: Instrument,
    recipe: Recipe,
    seed: int,
    *,
    library: str | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> GridData | OnTheFlyData:
    if recipe.data == "grid":
        return GridData(instrument, recipe, seed, library=library)
    if recipe.data == "on_the_fly":
        return OnTheFlyData(instrument, recipe, seed, progress=progress, device=device)
    raise InputError(f"unknown data source {recipe.data!r}; use 'grid' or 'on_the_fly'")
