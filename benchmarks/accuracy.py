"""Accuracy of a model against the Cramér–Rao bound on fresh off-grid frames.

    python benchmarks/accuracy.py [--model FILE] [--frames 4000] [--levels 3.5 7 14] [--exact 400]

For each count level (expected counts of the Laue maximum), simulates frames at random
(off-grid) parameters over the model's box, draws Poisson counts, predicts, and prints the RMSE
and bias per parameter beside the RMS CRLB at the same parameters and their ratio, then the
mean ensemble std and the rms expected error (``*_err``, which should match the RMSE). Each model
is measured as ``predict()`` gives it (networks, likelihood step, physics check) and, on the same
frames, with the networks alone (``check=False``); a two-stage model also without its refining
stage. Several models (--model A --model B) are measured side by side. ``--exact N`` also scores
N frames of the reference implementation at 32 x 32 sub-pixels (close to exact pixel
integration, unlike the 8 x 8 frames the models were trained on) at 7 counts, 5 noise draws
each, beside the same frames at 8 x 8.
"""

from __future__ import annotations

import argparse

import numpy as np

from nanobeam_bluesky.inference import Predictor, load_pretrained
from nanobeam_bluesky.physics import PARAMETERS, crlb, simulate, simulate_exact, to_counts
from nanobeam_bluesky.training import random_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", action="append", help="model file(s); default: the shipped one")
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--levels", type=float, nargs="+", default=[3.5, 7.0, 14.0])
    parser.add_argument("--upsample", type=int, default=None, help="sub-pixels of the test frames")
    parser.add_argument("--crlb-points", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--exact", type=int, default=0, help="reference frames at 32x32 sub-pixels")
    args = parser.parse_args()

    predictors = [Predictor.from_file(p) for p in args.model] if args.model else [load_pretrained()]
    inst = predictors[0].instrument
    rng = np.random.default_rng(args.seed)
    params = random_parameters(inst, args.frames, rng)
    frames = simulate(*params.T, inst, upsample=args.upsample)
    print(
        f"{args.frames} off-grid frames, instrument '{inst.name}', sub-pixels "
        f"{args.upsample or inst.upsample}x{args.upsample or inst.upsample}"
    )
    for level in args.levels:
        bound = crlb(*params[: args.crlb_points].T, inst, max_counts=level)
        bound_rms = np.sqrt((bound**2).mean(axis=0))
        counts = to_counts(frames, level, scale=1.0, rng=rng)
        print(f"\n-- {level:g} counts at the Laue maximum --")
        header = ("model", "param", "RMSE", "bias", "CRLB", "RMSE/CRLB", "mean std", "rms err")
        print("{:<62}{:>7}{:>11}{:>11}{:>11}{:>10}{:>11}{:>11}".format(*header))
        runs = [(p, True, True) for p in predictors] + [(p, True, False) for p in predictors]
        runs += [(p, False, False) for p in predictors if p.n_refiners]
        for predictor, refine, check in runs:
            ds = predictor.predict(counts, refine=refine, check=check)
            k = f"K={predictor.n_members}" + (
                f"+{predictor.n_refiners}" if refine and predictor.n_refiners else ""
            )
            how = "predict()" if check else "networks alone"
            for i, name in enumerate(PARAMETERS):
                err = ds[name].values - params[:, i]
                rmse = float(np.sqrt(np.nanmean(err**2)))
                label = predictor.model_id if refine else predictor.model_id.split("+")[0]
                label = f"{how}: {label} ({k})" if i == 0 else ""
                print(
                    f"{label:<62}{name:>7}{rmse:>11.3e}{np.nanmean(err):>11.2e}{bound_rms[i]:>11.3e}"
                    f"{rmse / bound_rms[i]:>10.2f}{np.nanmean(ds[f'{name}_std']):>11.2e}"
                    f"{np.sqrt(np.nanmean(ds[f'{name}_err'] ** 2)):>11.2e}"
                )

    if args.exact:
        exact_check(predictors, params[: args.exact], rng)


def exact_check(
    predictors, params: np.ndarray, rng: np.random.Generator, level: float = 7.0, draws: int = 5
) -> None:
    """RMSE and bias over CRLB on 8x8 (training sampling) and 32x32 (near exact) frames."""
    inst = predictors[0].instrument
    bound = np.sqrt((crlb(*params.T, inst, max_counts=level) ** 2).mean(axis=0))
    sets = {
        "8x8 (as trained)": simulate(*params.T, inst),
        "32x32 reference": simulate_exact(*params.T, inst, upsample=32),
    }
    print(f"\n-- {len(params)} frames x {draws} noise draws at {level:g} counts: RMSE / bias over CRLB --")
    for predictor in predictors:
        for label, frames in sets.items():
            errors = []
            for _ in range(draws):
                ds = predictor.predict(to_counts(frames, level, scale=1.0, rng=rng))
                errors.append(np.stack([ds[n].values - params[:, i] for i, n in enumerate(PARAMETERS)], 1))
            err = np.concatenate(errors)
            ratio = np.sqrt(np.nanmean(err**2, axis=0)) / bound
            bias = np.nanmean(err, axis=0) / bound
            print(
                f"{predictor.model_id:<34}{label:<18}"
                + "".join(
                    f"{n} {r:.2f} / {b:+.2f}   " for n, r, b in zip(PARAMETERS, ratio, bias, strict=True)
                )
            )


if __name__ == "__main__":
    main()
