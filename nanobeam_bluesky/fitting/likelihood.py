"""Ours, not the published method: a Poisson (multinomial) likelihood fit with Laplace refinement.

Counts m_p in a frame are Poisson with means a * s_p, with an unknown overall level a (beam
current, exposure). Maximising over a leaves the multinomial log-likelihood

    L_ijk = sum over pixels of m_p * log(s'_ijk,p),

with s' the unit-sum library frame plus a small uniform floor (``background_fraction``) so that a
count where the model has none costs a finite amount. Like the correlation it is one matrix
product (counts times log-library), it does not depend on the count level, and it weights pixels as
the noise demands.

The grid is coarse next to what a frame can resolve: at 7 counts omega is known to ~1e-4 deg, the
41-point grid steps by 2.5e-3 deg. So the estimate is not a grid point or a centre of mass but the
maximum of a quadratic fitted to L on the 3 x 3 x 3 grid neighbourhood of the best grid point (a
Laplace approximation; its full 3 x 3 curvature handles the strain-omega coupling), and the inverse
curvature gives a standard deviation per parameter.

Speed: the best grid point is searched on every ``coarse_stride``-th grid point (2: 7.4x fewer
flops on the 41^3 grid), then walked uphill on the full grid before the quadratic fit, so the
result is the full-grid search's wherever the likelihood has a single peak near the coarse best
point (identical on every test and benchmark frame we compared).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import InputError
from .base import GridFitter, rows_times
from .library import PARAMETERS, Library

__all__ = ["LikelihoodFitter"]

# Offsets of the 3 x 3 x 3 neighbourhood, and the least-squares map from its 27 values to the 10
# coefficients of a quadratic: c + g.d + (1/2) d.H.d in grid-index units.
_OFFSETS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(27, 3)
_D = _OFFSETS.astype(np.float64)
_DESIGN = np.column_stack(
    [np.ones(27), _D, 0.5 * _D**2, _D[:, 0] * _D[:, 1], _D[:, 0] * _D[:, 2], _D[:, 1] * _D[:, 2]]
)
_FIT = np.linalg.pinv(_DESIGN)  # (10, 27)
_CENTRE = 13  # index of offset (0, 0, 0)
# Frames whose 27 library rows are gathered together (27 * 4096 * 4 B = 0.44 MB per frame).
_GATHER_BATCH = 64
_MAX_WALK = 8


class LikelihoodFitter(GridFitter):
    """Our fit: multinomial log-likelihood on the grid, then a Laplace (quadratic) refinement.

    Args:
        library: the grid library; its axes must be evenly spaced.
        coarse_stride: search the best grid point on every n-th grid point first (1: all).
        background_fraction: fraction of a frame's counts spread uniformly over all pixels in the
            model (a floor that keeps log s finite); 1e-3 by default.
        **kwargs: ``chunk_size``, ``memory_budget_bytes``, ``progress`` (see :class:`GridFitter`).

    Adds ``strain_std``, ``omega_std``, ``chi_std`` (from the curvature; meaningful for raw counts,
    not for frames rescaled away from counts) and ``log_likelihood`` (nats, at the best grid
    point) to the output.
    """

    method = "ours"
    description = (
        "ours (not the published method): multinomial (Poisson, free count level) log-likelihood "
        "against every library frame, maximum of a quadratic fitted on the 3x3x3 grid neighbourhood"
    )
    extra_outputs: ClassVar[dict[str, tuple[str, str]]] = {
        "strain_std": ("1", "strain standard deviation (Laplace, from the likelihood curvature)"),
        "omega_std": ("deg", "omega standard deviation (Laplace, from the likelihood curvature)"),
        "chi_std": ("deg", "chi standard deviation (Laplace, from the likelihood curvature)"),
        "log_likelihood": ("nat", "multinomial log-likelihood at the best grid point"),
    }

    def __init__(
        self, library: Library, *, coarse_stride: int = 2, background_fraction: float = 1e-3, **kwargs: Any
    ) -> None:
        if not isinstance(coarse_stride, (int, np.integer)) or coarse_stride < 1:
            raise InputError(f"coarse_stride must be a positive integer, got {coarse_stride!r}")
        if not 0 < background_fraction < 1:
            raise InputError(f"background_fraction must be in (0, 1), got {background_fraction!r}")
        for name, axis in library.axes.items():
            steps = np.diff(axis)
            if not np.allclose(steps, steps[0], rtol=1e-6, atol=0):
                raise InputError(f"library axis {name!r} must be evenly spaced for the quadratic fit")
        self.coarse_stride = int(coarse_stride)
        self.background_fraction = float(background_fraction)
        super().__init__(library, **kwargs)

    def _prepare(self) -> None:
        lib = self.library
        p = lib.n_pixels
        floor = np.float32(self.background_fraction / p)
        norm = np.float32(1 + self.background_fraction)
        rows = lib.shape[1] * lib.shape[2]
        self._log_library = np.empty((lib.n_frames, p), dtype=np.float32)
        for i, slab in enumerate(lib.iter_unit_slabs(progress=self.progress)):
            self._log_library[i * rows : (i + 1) * rows] = np.log((slab + floor) / norm)
        self._shape = np.array(lib.shape)
        self._step = np.array([lib.axes[name][1] - lib.axes[name][0] for name in PARAMETERS])
        self._start = np.array([lib.axes[name][0] for name in PARAMETERS])
        # Coarse search grid: every stride-th point per axis, always including both ends.
        self._coarse_axes = [np.unique(np.r_[np.arange(0, n, self.coarse_stride), n - 1]) for n in lib.shape]
        coarse = np.stack(np.meshgrid(*self._coarse_axes, indexing="ij"), -1).reshape(-1, 3)
        self._coarse_index = coarse
        if self.coarse_stride == 1:
            self._coarse_library = self._log_library
        else:
            self._coarse_library = self._log_library[np.ravel_multi_index(coarse.T, lib.shape)]

    def _bytes_per_frame(self) -> int:
        # A coarse likelihood row and the float32 counts; the 27-row gathers use a fixed batch.
        return 4 * (len(self._coarse_library) + 2 * self.library.n_pixels)

    def _neighbourhood(self, counts: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """Log-likelihoods (B, 27) of the grid points around ``centres`` (B, 3), in float64."""
        # asarray (a no-op here): numpy's stubs pick the scalar overload for an index array of
        # unknown dtype
        flat = np.asarray(
            np.ravel_multi_index((centres[:, None, :] + _OFFSETS).transpose(2, 0, 1), self.library.shape)
        )
        values = np.empty(flat.shape)
        for start in range(0, len(flat), _GATHER_BATCH):
            stop = start + _GATHER_BATCH
            rows = self._log_library[flat[start:stop]]  # (b, 27, P)
            self._track(rows)
            values[start:stop] = np.matmul(rows, counts[start:stop, :, None])[..., 0]
        return values

    def _fit_chunk(self, counts: np.ndarray, totals: np.ndarray) -> dict[str, np.ndarray]:
        coarse = rows_times(counts, self._coarse_library)  # (B, n_coarse)
        self._track(counts, coarse)
        best = self._coarse_index[np.argmax(coarse, axis=1)]
        del coarse
        # Walk uphill on the full grid until the centre of the 3x3x3 neighbourhood is its best point
        # (kept one step inside the grid so the neighbourhood exists; the quadratic extrapolates).
        centres = np.clip(best, 1, self._shape - 2)
        values = self._neighbourhood(counts, centres)
        todo = np.arange(len(counts))
        for _ in range(_MAX_WALK):
            moved = np.clip(centres[todo] + _OFFSETS[np.argmax(values[todo], axis=1)], 1, self._shape - 2)
            changed = (moved != centres[todo]).any(axis=1)
            todo = todo[changed]
            if not len(todo):
                break
            centres[todo] = moved[changed]
            values[todo] = self._neighbourhood(counts[todo], centres[todo])
        # The estimate stays inside the library's box: one step around the centre, which sits one
        # step inside the grid.
        offset, std = _quadratic_peak(values, np.full(centres.shape, -1.0), np.full(centres.shape, 1.0))
        estimate = self._start + (centres + offset) * self._step
        std = std * self._step
        out = {name: estimate[:, i] for i, name in enumerate(PARAMETERS)}
        out |= {f"{name}_std": std[:, i] for i, name in enumerate(PARAMETERS)}
        out["log_likelihood"] = values[:, _CENTRE]
        return out


def _quadratic_peak(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peak offset (B, 3) within [low, high] grid steps and its std (B, 3), in grid units.

    Least-squares quadratic c + g.d + (1/2) d.H.d through the 27 values. Where H is negative
    definite, the peak is its maximum inside the box [low, high]: the axis farthest outside is pinned
    to its bound and the others are re-solved given it, and so on (so a peak at the edge of the
    library does not drag the coupled parameters with it); the covariance is -H^-1. Elsewhere each
    axis falls back to its own parabola.
    """
    coef = (values[:, None, :] * _FIT).sum(axis=2)  # not BLAS: per-frame arithmetic, chunk-independent
    grad = coef[:, 1:4]
    hess = np.empty((len(values), 3, 3))
    hess[:, [0, 1, 2], [0, 1, 2]] = coef[:, 4:7]
    hess[:, 0, 1] = hess[:, 1, 0] = coef[:, 7]
    hess[:, 0, 2] = hess[:, 2, 0] = coef[:, 8]
    hess[:, 1, 2] = hess[:, 2, 1] = coef[:, 9]
    diag = np.diagonal(hess, axis1=1, axis2=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(diag < 0, -grad / diag, 0.0)
        std = np.where(diag < 0, np.sqrt(-1 / diag), np.nan)
    definite = np.linalg.eigvalsh(hess).max(axis=1) < 0
    if definite.any():
        h, g = hess[definite], grad[definite]
        lo, hi = low[definite], high[definite]
        cov = np.linalg.inv(-h)
        peak = np.einsum("bij,bj->bi", cov, g)
        pinned = np.zeros(peak.shape, dtype=bool)
        rows = np.arange(len(peak))
        for _ in range(3):
            excess = np.where(pinned, 0.0, np.maximum(lo - peak, peak - hi))
            worst = np.argmax(excess, axis=1)
            outside = excess[rows, worst] > 0
            if not outside.any():
                break
            # Pin one axis at a time, the farthest outside: pinning it moves the coupled others.
            pinned[rows[outside], worst[outside]] = True
            bound = np.clip(peak, lo, hi)
            # Rows of pinned axes become "d_a = bound"; free rows keep H d = -g.
            system = np.where(pinned[:, :, None], np.eye(3), h)
            rhs = np.where(pinned, bound, -g)
            peak = np.linalg.solve(system, rhs[..., None])[..., 0]
        offset[definite] = peak
        std[definite] = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    return np.clip(offset, low, high), std
