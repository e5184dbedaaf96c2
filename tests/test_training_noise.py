"""The compiled training-data kernels (issue 19): exact Poisson counts, the sparse background,
the same counts on any number of threads, and the detector masks of the tensor reference."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch

from nanobeam_bluesky.training._kernels import detector_masks, poisson_counts
from nanobeam_bluesky.training.data import masks_from_draws, noisy_counts

pytestmark = pytest.mark.unit


def draw(frames: np.ndarray, scale: float, background: float, seed: int = 7) -> np.ndarray:
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    out = np.empty_like(frames)
    n = len(frames)
    poisson_counts(frames, np.full(n, scale), np.full(n, background), seed, out)
    return out


def poisson_pmf(k: np.ndarray, lam: float) -> np.ndarray:
    return np.exp(k * math.log(lam) - lam - np.array([math.lgamma(x + 1.0) for x in k]))


@pytest.mark.parametrize("lam", [0.03, 0.7, 3.0, 9.9, 10.1, 37.0, 2500.0])
def test_counts_follow_the_poisson_distribution(lam: float) -> None:
    """Both branches (inversion below 10 expected counts, PTRS above) and the switch between them:
    mean and variance within 5 standard errors, and a chi-square over the bins holding 99.9 % of
    the probability below its 1e-6 tail (binned so every bin expects >= 20 draws)."""
    n = 400_000
    counts = draw(np.ones((100, n // 100)), lam, 0.0).ravel()
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    assert abs(counts.mean() - lam) < 5 * math.sqrt(lam / n)
    # var of the sample variance of a Poisson: (lam + 2 lam^2 (n / (n - 1))) / n
    assert abs(counts.var() - lam) < 5 * math.sqrt((lam + 2 * lam**2) / n)
    low, high = int(max(0, lam - 8 * math.sqrt(lam) - 2)), int(lam + 8 * math.sqrt(lam) + 4)
    k = np.arange(low, high + 1)
    expected = n * poisson_pmf(k.astype(float), lam)
    observed = np.bincount((counts - low).clip(0, high - low).astype(int), minlength=len(k))[: len(k)]
    keep = expected >= 20
    chi2 = float((((observed[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty: the chi-square's 1e-6 upper tail (z = 4.75)
    limit = dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, dof, limit)


def test_the_sparse_background_is_poisson_on_every_dark_pixel() -> None:
    """A frame with a lit half and a dark half, background b: every dark pixel averages b counts
    with variance b (no pixel favoured), the lit half scale * frame + b."""
    frames = np.zeros((4000, 64), dtype=np.float32)
    frames[:, :32] = 0.5
    counts = draw(frames, 4.0, 0.2, seed=11)
    dark, lit = counts[:, 32:], counts[:, :32]
    n = len(frames)
    assert abs(dark.mean() - 0.2) < 5 * math.sqrt(0.2 / dark.size)
    per_pixel = dark.mean(0)  # each of 32 dark pixels over 4,000 frames
    assert np.all(np.abs(per_pixel - 0.2) < 5 * math.sqrt(0.2 / n)), per_pixel
    assert abs(dark.var() - 0.2) < 0.01
    assert abs(lit.mean() - 2.2) < 5 * math.sqrt(2.2 / lit.size)
    # No background: the dark pixels stay exactly zero.
    assert not draw(frames, 4.0, 0.0)[:, 32:].any()


def test_counts_are_seeded_and_the_same_on_any_number_of_threads() -> None:
    rng = np.random.default_rng(3)
    frames = (rng.random((64, 4096)) * (rng.random((64, 4096)) > 0.6)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = draw(frames, 7.0, 0.1, seed=5)
        numba.set_num_threads(before)
        many = draw(frames, 7.0, 0.1, seed=5)
    finally:
        numba.set_num_threads(before)
    # Integer counts from streams keyed by (seed, frame): the same integers, not merely close.
    np.testing.assert_array_equal(one, many)
    assert (draw(frames, 7.0, 0.1, seed=6) != one).mean() > 0.2


def test_a_negative_or_nan_expectation_gives_nan_not_a_count() -> None:
    frames = np.array([[1.0, -1.0, np.nan, 0.0]], dtype=np.float32)
    out = draw(frames, 1.0, 0.0)
    assert not np.isnan(out[0, 0]) and np.isnan(out[0, 1]) and np.isnan(out[0, 2]) and out[0, 3] == 0


def test_noisy_counts_scale_the_frames_by_the_drawn_count_level_and_background() -> None:
    """The training noise on the CPU: 7 counts x a level log-uniform in [0.5, 3], plus a flat
    background uniform in [0, 0.12]: over many frames of one lit pixel the mean is
    7 x E[level] + 0.06, E[level] = 2.5 / ln 6."""
    frames = torch.zeros((20_000, 2, 2), dtype=torch.float16)
    frames[:, 0, 0] = 1.0
    counts = noisy_counts(frames, 7.0, (0.5, 3.0), torch.Generator().manual_seed(1), 0.12)
    assert abs(float(counts[:, 0, 0].mean()) - (7 * 2.5 / math.log(6) + 0.06)) < 0.1
    assert abs(float(counts[:, 1:, :].mean()) - 0.06) < 0.01
    again = noisy_counts(frames, 7.0, (0.5, 3.0), torch.Generator().manual_seed(1), 0.12)
    torch.testing.assert_close(counts, again, rtol=0, atol=0)


def test_compiled_detector_masks_equal_the_tensor_reference() -> None:
    draws = torch.rand((500, 8), generator=torch.Generator().manual_seed(2))
    compiled = np.empty((500, 64, 64), dtype=bool)
    detector_masks(draws.double().numpy(), 0.4, 64, compiled)
    reference = masks_from_draws(draws, 0.4, 64).numpy()
    np.testing.assert_array_equal(compiled, reference)
    assert 150 < int(reference.any((1, 2)).sum()) < 250
