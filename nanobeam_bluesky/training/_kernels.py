"""The training data's per-pixel work on the CPU, compiled (numba): Poisson counts and the mask fill.

Profiled on a 2-core CPU, a training batch of 256 frames spent 19 ms drawing its Poisson noise
(``torch.poisson``, ~18 ns a pixel, single-threaded per call) and 13 ms filling its masked frames
(four 3 x 3 convolutions over every masked frame), against 17 ms for the network's own step. Both
are a handful of operations per pixel, and most pixels of a frame expect well under one count.

- :func:`poisson_counts` draws each frame from its own stream (splitmix64 keyed by the batch seed
  and the frame's index): exact Poisson (inversion below 10 expected counts, Hörmann's PTRS
  above), the same numbers on any number of threads; the flat background is drawn sparsely over
  the pixels that expect nothing else.
- :func:`fill_masked` is :func:`nanobeam_bluesky.inference.inpaint_tensor`'s arithmetic (two
  Jacobi passes of the 3 x 3 mean of the known neighbours, then the frame's mean), visiting only
  the masked pixels.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["detector_masks", "fill_masked", "poisson_counts"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
#: Below this many expected counts a pixel is drawn by inversion (expected cost ~ lambda + 1
#: steps); at and above it by PTRS (a constant ~1.2 tries), as numpy's own sampler switches.
_INVERSION_BELOW = 10.0


@numba.njit(inline="always")
def _mix64(z):  # pragma: no cover - compiled
    """splitmix64's output function (Steele, Lea & Flood 2014)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _uniform(state):  # pragma: no cover - compiled
    """(uniform in [0, 1) with 53 random bits, the advanced state)."""
    state = state + _GOLDEN
    return np.float64(_mix64(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0), state


#: 1 / k for the inversion walk (a multiply where a division would set its pace).
_RECIPROCALS = 1.0 / np.arange(1, 202, dtype=np.float64)


@numba.njit
def _poisson_one(lam, state):  # pragma: no cover - compiled
    """(a Poisson(``lam``) count, ``lam`` > 0, the advanced state)."""
    if lam < _INVERSION_BELOW:
        u, state = _uniform(state)
        k = 0
        p = math.exp(-lam)
        cdf = p
        # The guard ends a walk that rounding keeps below u (u within 1e-16 of 1).
        while u > cdf and k < 200:
            p *= lam * _RECIPROCALS[k]
            k += 1
            cdf += p
        return k, state
    # PTRS: Hörmann (1993), "The transformed rejection method for generating Poisson random
    # variables", Insurance: Mathematics and Economics 12, 39-45 (numpy's constants).
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u, state = _uniform(state)
        v, state = _uniform(state)
        u -= 0.5
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k, state
        if k < 0 or (us < 0.013 and v > us):
            continue
        if v > 0.0 and math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return k, state


@numba.njit(parallel=True, cache=True)
def poisson_counts(frames, scale, background, seed, out):  # pragma: no cover - compiled
    """Poisson counts of ``scale[i] * frames[i] + background[i]`` (frames (N, P) float32 >= 0,
    scale and background (N,) float64 >= 0) into ``out`` (N, P) float32.

    Frame i draws from its own splitmix64 stream keyed by (``seed``, i), so the counts do not
    depend on the number of threads. The flat background is drawn sparsely where the frame
    expects nothing (59 % of a training frame's pixels): Poisson(n_dark * b) counts in all,
    each on a dark pixel chosen uniformly -- the same distribution as a draw per pixel.
    """
    n, n_pixels = frames.shape
    key = _mix64(np.uint64(seed) ^ _GOLDEN)
    for f in numba.prange(n):
        state = _mix64(key ^ _mix64(np.uint64(f) + _GOLDEN))
        s = scale[f]
        b = background[f]
        dark = np.empty(n_pixels, dtype=np.int64)
        n_dark = 0
        for p in range(n_pixels):
            lam = s * np.float64(frames[f, p]) + b
            if frames[f, p] == 0.0:
                out[f, p] = 0.0
                dark[n_dark] = p
                n_dark += 1
            elif lam > 0.0 and lam < 1e12:
                k, state = _poisson_one(lam, state)
                out[f, p] = k
            else:  # NaN, negative or absurd: stays visible as NaN
                out[f, p] = np.nan
        if n_dark and b > 0.0:
            total, state = _poisson_one(n_dark * b, state)
            for _ in range(total):
                u, state = _uniform(state)
                out[f, dark[min(int(u * n_dark), n_dark - 1)]] += 1.0


@numba.njit(parallel=True, cache=True)
def detector_masks(draws, fraction, pixels, out):  # pragma: no cover - compiled
    """:func:`nanobeam_bluesky.training.data.random_detector_masks` from its uniform ``draws``
    (n, 8): a frame with ``draws[i, 0] < fraction`` gets a band of 1-2 dead rows or columns and
    0-4 dead pixels; ``out`` (n, pixels, pixels) bool, cleared here."""
    for i in numba.prange(draws.shape[0]):
        out[i] = False
        u = draws[i]
        if not u[0] < fraction:
            continue
        width = 2 if u[1] < 0.5 else 1
        start = int(u[2] * (pixels - width + 1))
        for j in range(start, start + width):
            for m in range(pixels):
                if u[3] < 0.5:
                    out[i, j, m] = True
                else:
                    out[i, m, j] = True
        for k in range(int(u[4] * 5)):
            row = int(((u[5] + 0.37 * k) % 1.0) * pixels)
            col = int(((u[6] + 0.61 * k) % 1.0) * pixels)
            out[i, row, col] = True


@numba.njit(parallel=True, cache=True)
def fill_masked(counts, masked, out):  # pragma: no cover - compiled
    """``counts`` (N, F, F) float32 with the ``masked`` (bool) pixels filled as ``inpaint_tensor``
    fills them, into ``out``: two passes, each giving every masked pixel with a known 3 x 3
    neighbour the mean of its known neighbours (known as of the pass before), then what is left
    the mean of the frame's known pixels."""
    n, rows, cols = counts.shape
    for f in numba.prange(n):
        filled = counts[f].copy()
        known = ~masked[f]
        left = 0
        for r in range(rows):
            for c in range(cols):
                if not known[r, c]:
                    filled[r, c] = 0.0
                    left += 1
        for _ in range(2):
            if left == 0:
                break
            fresh = known.copy()
            for r in range(rows):
                for c in range(cols):
                    if known[r, c]:
                        continue
                    total = np.float32(0.0)
                    weight = 0
                    for rr in range(max(r - 1, 0), min(r + 2, rows)):
                        for cc in range(max(c - 1, 0), min(c + 2, cols)):
                            if known[rr, cc]:
                                total += filled[rr, cc]
                                weight += 1
                    if weight:
                        filled[r, c] = total / np.float32(weight)
                        fresh[r, c] = True
                        left -= 1
            known = fresh
        if left:
            total64 = 0.0
            n_known = 0
            for r in range(rows):
                for c in range(cols):
                    if known[r, c]:
                        total64 += filled[r, c]
                        n_known += 1
            mean = np.float32(total64 / max(n_known, 1))
            for r in range(rows):
                for c in range(cols):
                    if not known[r, c]:
                        filled[r, c] = mean
        out[f] = filled
