"""Scoring (strain, omega, chi) maps against a known truth (phantoms, simulated scans)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from .physics import PARAMETERS

__all__ = ["MapErrors", "map_errors"]


@dataclass(frozen=True)
class MapErrors:
    """Errors of one method's maps, per parameter (strain dimensionless, tilts in degrees)."""

    rmse: dict[str, float]
    bias: dict[str, float]
    #: Fraction of pixels without an estimate (NaN), per parameter.
    missing: dict[str, float]
    #: Correlation of the strain error with the true omega: how well the two are separated.
    strain_error_vs_omega: float


def map_errors(result: xr.Dataset, truth: xr.Dataset) -> MapErrors:
    """RMSE, bias (mean signed error) and missing fraction of ``result`` against ``truth``."""
    rmse, bias, missing = {}, {}, {}
    for p in PARAMETERS:
        err = (np.asarray(result[p].values, dtype=float) - np.asarray(truth[p].values, dtype=float)).ravel()
        ok = np.isfinite(err)
        rmse[p] = float(np.sqrt(np.mean(err[ok] ** 2))) if ok.any() else float("nan")
        bias[p] = float(np.mean(err[ok])) if ok.any() else float("nan")
        missing[p] = float(np.mean(~ok))
    strain_err = (np.asarray(result["strain"].values) - np.asarray(truth["strain"].values)).ravel()
    ok = np.isfinite(strain_err)
    true_omega = np.asarray(truth["omega"].values).ravel()[ok]
    corr = float(np.corrcoef(strain_err[ok], true_omega)[0, 1]) if ok.sum() > 2 else float("nan")
    return MapErrors(rmse, bias, missing, corr)
