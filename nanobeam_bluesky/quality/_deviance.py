"""What Poisson noise alone does to the deviance: its mean and variance per pixel.

The unit deviance of a count n against an expectation mu is 2 (n log(n / mu) - (n - mu)). For
n ~ Poisson(mu) its mean is about 1 for mu >> 1 but falls to 2 mu log(1/mu) for mu << 1, and its
variance goes from 2 to 0 the same way, so a frame's deviance must be compared with the sum of
these over its pixels, not with the pixel count. Both are tabulated once, exactly (sums over the
Poisson distribution, 12 sigma either side), on a grid in log mu from 1e-6 to 1e3, and
interpolated; above 1e3 they are 1 and 2 to 2e-4.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["deviance_moments", "deviance_table", "unit_deviance_moments"]

_LOG_MU = np.linspace(math.log(1e-6), math.log(1e3), 601)


@functools.lru_cache(maxsize=1)
def _table() -> tuple[torch.Tensor, torch.Tensor]:
    mean = np.empty(len(_LOG_MU))
    var = np.empty(len(_LOG_MU))
    top = int(1e3 + 12 * math.sqrt(1e3) + 22)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1)))])
    for i, mu in enumerate(np.exp(_LOG_MU)):
        width = 12 * math.sqrt(mu) + 20
        n = np.arange(max(0, int(mu - width)), int(mu + width) + 1)
        pmf = np.exp(n * math.log(mu) - mu - log_factorial[n])
        n = n.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 2 * (np.where(n > 0, n * np.log(n / mu), 0.0) - (n - mu))
        mean[i] = (pmf * d).sum()
        var[i] = (pmf * d * d).sum() - mean[i] ** 2
    return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(var, dtype=torch.float32)


def unit_deviance_moments(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the unit deviance of a Poisson(mu) count (mu > 0), float32 like mu."""
    mean, var = _table()
    step = float(_LOG_MU[1] - _LOG_MU[0])
    pos = ((torch.log(mu.clamp(min=1e-6)) - float(_LOG_MU[0])) / step).clamp_(0, len(_LOG_MU) - 1.0001)
    i = pos.long()
    f = pos - i
    m0, v0 = mean[i], var[i]
    return m0 + f * (mean[i + 1] - m0), v0 + f * (var[i + 1] - v0)


def deviance_moments(mu) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the unit deviance for an array of expectations (numpy in and out)."""
    m, v = unit_deviance_moments(torch.as_tensor(np.asarray(mu, dtype=np.float32)))
    return m.numpy(), v.numpy()


def deviance_table() -> tuple[float, float, np.ndarray, np.ndarray]:
    """(log mu of the first entry, step in log mu, means, variances) for fused kernels."""
    mean, var = _table()
    return (float(_LOG_MU[0]), float(_LOG_MU[1] - _LOG_MU[0]), mean.double().numpy(), var.double().numpy())
