"""Cramer-Rao lower bound on (strain, omega, chi) from one Poisson-noisy frame."""

from __future__ import annotations

import numpy as np

from .forward import as_parameters, simulate
from .instrument import Instrument

__all__ = ["crlb", "fisher_information"]

#: Finite-difference steps (strain, omega deg, chi deg): about 0.1 binned pixel of annulus motion,
#: over one or two sub-pixels at DEFAULT_UPSAMPLE, so derivatives average the sampled edges.
DEFAULT_STEPS = (1e-5, 5e-4, 1.5e-3)
#: Sub-pixel sampling for the bound: fine enough (16 x 16) to approach pixel integration.
DEFAULT_UPSAMPLE = 16


def fisher_information(
    strain,
    omega_deg,
    chi_deg,
    instrument: Instrument = Instrument(),
    *,
    max_counts: float = 7.0,
    scale: float = 1.0,
    background: float = 0.0,
    steps: tuple[float, float, float] = DEFAULT_STEPS,
    upsample: int | None = DEFAULT_UPSAMPLE,
) -> np.ndarray:
    """Fisher information matrices (N, 3, 3) for expected counts max_counts * frame / scale.

    F_ij = sum over pixels of (d mu / d theta_i)(d mu / d theta_j) / mu, with central differences;
    pixels with mu = 0 carry no information (add ``background`` counts per pixel to include them).
    Parameter order (strain, omega_deg, chi_deg); units follow the parameters.
    """
    theta = np.stack(as_parameters(strain, omega_deg, chi_deg), axis=1)  # (N, 3)
    n = len(theta)
    stencil = [theta]
    for i, h in enumerate(steps):
        for sign in (1, -1):
            shifted = theta.copy()
            shifted[:, i] += sign * h
            stencil.append(shifted)
    points = np.concatenate(stencil)
    strains, omegas, chis = points.T
    frames = simulate(strains, omegas, chis, instrument, upsample=upsample).astype(np.float64)
    mu_all = frames.reshape(7, n, -1) * (max_counts / scale) + background
    mu = mu_all[0]
    grads = np.stack(
        [(mu_all[1 + 2 * i] - mu_all[2 + 2 * i]) / (2 * h) for i, h in enumerate(steps)], axis=1
    )  # (N, 3, P)
    inv_mu = np.where(mu > 0, 1.0 / np.where(mu > 0, mu, 1.0), 0.0)
    return np.einsum("nip,njp,np->nij", grads, grads, inv_mu)


def crlb(
    strain,
    omega_deg,
    chi_deg,
    instrument: Instrument = Instrument(),
    *,
    max_counts: float = 7.0,
    scale: float = 1.0,
    background: float = 0.0,
    steps: tuple[float, float, float] = DEFAULT_STEPS,
    upsample: int | None = DEFAULT_UPSAMPLE,
) -> np.ndarray:
    """Lower bound on the standard deviation of unbiased estimates, (N, 3): strain, omega, chi.

    Units: strain dimensionless, omega and chi in degrees. The keyword arguments are those of
    :func:`fisher_information`.
    """
    info = fisher_information(
        strain,
        omega_deg,
        chi_deg,
        instrument,
        max_counts=max_counts,
        scale=scale,
        background=background,
        steps=steps,
        upsample=upsample,
    )
    return np.sqrt(np.diagonal(np.linalg.inv(info), axis1=1, axis2=2))
