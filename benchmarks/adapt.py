"""``nanobeam adapt`` on scans whose instrument departs from the model's: RMSE before and after.

    python benchmarks/adapt.py [--model FILE] [--frames 2048] [--steps 300]

Departures (the model is for the default instrument of docs/physics.md):

* the central stop is 70 µm, not 77 µm;
* the detector is 2 % further (0.867 m, not 0.85 m);
* the film is 170 Å, outside the ±35 % box the model was trained on (76-158 Å).

For each, a scan of ``--frames`` frames at 7 counts is simulated with the departed instrument
(8 x 8 sub-pixels), the model is adapted on it, and fresh frames of the same instrument are
predicted, before and after, by the networks alone (``check=False``) and by the default
``predict()`` (the physics check uses the data's instrument in both). Printed: RMSE / CRLB (ε, ω,
χ[, t]) against the bound of the data's instrument with the film unknown, the flagged share and
the loss (mean Poisson deviance per frame) before and after.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from nanobeam_bluesky.departures import random_parameters
from nanobeam_bluesky.inference import Predictor
from nanobeam_bluesky.physics import Instrument, crlb, simulate
from nanobeam_bluesky.training.adapt import adapt_model

NAMES = ("strain", "omega", "chi")


def frames_of(instrument: Instrument, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = random_parameters(instrument, n, rng)
    return rng.poisson(7.0 * simulate(*params.T, instrument)).astype(np.float32), params


def ratios(ds, params: np.ndarray, film: float, bound: np.ndarray) -> tuple[str, float]:
    ok = ds["flag"].values == 0
    if ok.sum() < 10:
        return "-", float(1 - ok.mean())
    est = np.stack([ds[p].values for p in NAMES], 1)
    rmse = list(np.sqrt(np.nanmean((est[ok] - params[ok]) ** 2, axis=0)))
    if "thickness" in ds:
        rmse.append(float(np.sqrt(np.nanmean((ds["thickness"].values[ok] - film) ** 2))))
    r = np.asarray(rmse) / bound[: len(rmse)]
    return " / ".join(f"{v:.2f}" for v in r), float(1 - ok.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", help="model file (default: the shipped one)")
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    path = (
        Path(args.model)
        if args.model
        else resources.files("nanobeam_bluesky") / "pretrained" / "nanobeam-default.pt"
    )
    parent = Predictor.from_file(path)
    base = parent.instrument
    departures = {
        "central stop 70 µm (model: 77 µm)": base.replace(central_stop_diameter_m=70e-6),
        "detector 2 % further (0.867 m)": base.replace(detector_distance_m=base.detector_distance_m * 1.02),
        "film 170 Å (model's box 76-158 Å)": base.replace(film_thickness_angstrom=170.0),
    }
    print(f"model {parent.model_id} ({parent.sha256[:12]}); {args.frames} scan frames, {args.steps} steps\n")
    print(
        "| departure | networks alone: before | after | default predict(): before (flagged) "
        "| after (flagged) | loss before → after | adapt time |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, (name, data) in enumerate(departures.items()):
        scan, _ = frames_of(data, args.frames, 100 + i)
        test, params = frames_of(data, 1000, 200 + i)
        bound_points = params[:64]
        bound = np.sqrt(
            (crlb(*bound_points.T, data, with_thickness=True, nuisance=("scale",)) ** 2).mean(axis=0)
        )
        film = data.film_thickness_angstrom
        kwargs = {"instrument": data, "allow_instrument_mismatch": True}
        before_net, _ = ratios(parent.predict(test, **kwargs, check=False), params, film, bound)
        before, before_flagged = ratios(parent.predict(test, **kwargs), params, film, bound)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = adapt_model(path, scan, Path(tmp) / "adapted.pt", data, steps=args.steps, progress=False)
            spent = time.perf_counter() - t0
            adapted = Predictor.from_file(result.out)
            after_net, _ = ratios(adapted.predict(test, instrument=data, check=False), params, film, bound)
            after, after_flagged = ratios(adapted.predict(test, instrument=data), params, film, bound)
        print(
            f"| {name} | {before_net} | {after_net} | {before} ({before_flagged:.0%}) "
            f"| {after} ({after_flagged:.0%}) | {result.loss_before:.0f} → {result.loss_after:.0f} "
            f"| {spent:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
