"""Cramer-Rao lower bound on (strain, omega, chi[, thickness]) from one Poisson-noisy frame.

The expected counts of a frame are ``mu = A * frame(strain, omega, chi; thickness) + b`` with
``A = max_counts / scale`` and a flat background ``b`` (counts per binned pixel). The bound is
the square root of the diagonal of the inverse Fisher information of every parameter that is not
known. By default only (strain, omega, chi) are unknown; ``with_thickness`` adds the film
thickness, ``nuisance`` the count scale ``A`` and/or the background ``b``: unknown, but not
reported. Each unknown added can only raise the bound of the others.

Only observed pixels inform: those the instrument declares dead (``detector_mask_*``, binned as
``predict()`` bins them) and any ``mask`` given carry no information.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .counts import binned_instrument_mask
from .forward import as_parameters, simulate
from .instrument import Instrument

__all__ = ["NUISANCES", "crlb", "fisher_information"]

#: Finite-difference steps (strain, omega deg, chi deg): about 0.1 binned pixel of annulus motion,
#: over one or two sub-pixels at DEFAULT_UPSAMPLE, so derivatives average the sampled edges.
DEFAULT_STEPS = (1e-5, 5e-4, 1.5e-3)
#: Finite-difference step of the film thickness, Å (the Laue band moves smoothly with it).
THICKNESS_STEP_ANGSTROM = 0.5
#: Sub-pixel sampling for the bound: fine enough (16 x 16) to approach pixel integration.
DEFAULT_UPSAMPLE = 16
#: Parameters that may be unknown but are not reported: the count scale and the flat background.
NUISANCES = ("scale", "background")


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
    thickness_angstrom: Any = None,
    with_thickness: bool = False,
    nuisance: Sequence[str] = (),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Fisher information matrices (N, K, K) for expected counts ``A * frame + background``.

    F_ij = sum over pixels of (d mu / d theta_i)(d mu / d theta_j) / mu, with central differences;
    pixels with mu = 0 carry no information (add ``background`` counts per pixel to include them).
    Parameter order: strain, omega_deg, chi_deg, then the thickness (Å) when ``with_thickness``,
    then the ``nuisance`` parameters in the order given ("scale": A = max_counts / scale;
    "background": b, which must then be > 0). ``thickness_angstrom``: the true thickness of each
    frame (None: the instrument's). ``mask``: (F, F) bool, True = pixels left out besides the
    instrument's declared ones. Units follow the parameters.
    """
    unknown = [n for n in nuisance if n not in NUISANCES]
    if unknown:
        raise InputError(f"nuisance parameters must be among {NUISANCES}, got {unknown}")
    if "background" in nuisance and background <= 0:
        raise InputError("a background nuisance needs a background > 0 counts per pixel (b = 0 is its edge)")
    theta = np.stack(as_parameters(strain, omega_deg, chi_deg), axis=1)  # (N, 3)
    n = len(theta)
    thickness = np.broadcast_to(
        np.asarray(
            instrument.film_thickness_angstrom if thickness_angstrom is None else thickness_angstrom,
            dtype=np.float64,
        ),
        (n,),
    )
    # Central differences: (strain, omega, chi) and, when unknown, the thickness.
    points, widths = [(theta, thickness)], []
    for i, h in enumerate(steps):
        for sign in (1, -1):
            shifted = theta.copy()
            shifted[:, i] += sign * h
            points.append((shifted, thickness))
        widths.append(2 * h)
    if with_thickness:
        for sign in (1, -1):
            points.append((theta, thickness + sign * THICKNESS_STEP_ANGSTROM))
        widths.append(2 * THICKNESS_STEP_ANGSTROM)
    params = np.concatenate([p for p, _ in points])
    frames = simulate(
        params[:, 0],
        params[:, 1],
        params[:, 2],
        instrument,
        upsample=upsample,
        thickness_angstrom=np.concatenate([t for _, t in points]),
    ).astype(np.float64)
    amplitude = max_counts / scale
    f = frames.reshape(len(points), n, -1)
    mu = f[0] * amplitude + background
    grads = [(f[1 + 2 * i] - f[2 + 2 * i]) * amplitude / w for i, w in enumerate(widths)]
    for name in nuisance:
        grads.append(f[0] if name == "scale" else np.ones_like(mu))
    g = np.stack(grads, axis=1)  # (N, K, P)
    inv_mu = np.where(mu > 0, 1.0 / np.where(mu > 0, mu, 1.0), 0.0)
    unobserved = binned_instrument_mask(instrument)
    if mask is not None:
        extra = np.asarray(mask, dtype=bool)
        if extra.shape != frames.shape[-2:]:
            raise InputError(f"mask must be {frames.shape[-2:]} (True = left out), got shape {extra.shape}")
        unobserved = extra if unobserved is None else unobserved | extra
    if unobserved is not None:
        inv_mu = inv_mu * ~unobserved.ravel()
    return np.einsum("nip,njp,np->nij", g, g, inv_mu)


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
    thickness_angstrom: Any = None,
    with_thickness: bool = False,
    nuisance: Sequence[str] = (),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Lower bound on the standard deviation of unbiased estimates: (N, 3) strain, omega, chi,
    or (N, 4) with the thickness (Å) when ``with_thickness``; the ``nuisance`` parameters are
    unknown but not reported.

    Units: strain dimensionless, omega and chi in degrees, thickness in Å. The keyword arguments
    are those of :func:`fisher_information`.
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
        thickness_angstrom=thickness_angstrom,
        with_thickness=with_thickness,
        nuisance=nuisance,
        mask=mask,
    )
    reported = 4 if with_thickness else 3
    return np.sqrt(np.diagonal(np.linalg.inv(info), axis1=1, axis2=2))[:, :reported]
