"""Accuracy per unit of CPU time: the paper's CNN against our MLP, same recipe, same time budget.

    python benchmarks/architectures.py [--minutes 10] [--threads 2]

Both networks are trained with our default recipe (on-the-fly off-grid frames, fresh noise,
count augmentation, cosine schedule) for the same wall-clock budget on this machine: each one's
training speed is measured first, and its number of frames is set to fill the budget. Then both
are scored on the same fresh off-grid frames at 7 counts (RMSE / Cramér–Rao bound) and timed for
inference. Prints the two side by side and the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nanobeam_bluesky.inference import Predictor
from nanobeam_bluesky.models import build_model, count_parameters
from nanobeam_bluesky.physics import PARAMETERS, Instrument, crlb, simulate, to_counts
from nanobeam_bluesky.training import DEFAULT_RECIPE, model_metadata, random_parameters, train_member

ARCHITECTURES = {
    "paper CNN": DEFAULT_RECIPE.replace(architecture="paper", architecture_kwargs={}),
    "ours (MLP 256-256)": DEFAULT_RECIPE,
}


def _training_rate(recipe, steps: int = 30) -> float:
    """Training frames/s of the recipe's network (forward, backward, Adam step)."""
    model = build_model(recipe.architecture, **recipe.architecture_kwargs)
    optimiser = torch.optim.Adam(model.parameters())
    x = torch.poisson(torch.full((recipe.batch_size, 1, 64, 64), 3.0))
    y = torch.zeros(recipe.batch_size, 3)
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        loss = ((model(x) - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return steps * recipe.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per network")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=3000, help="test frames")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inst = Instrument()
    rng = np.random.default_rng(99)
    params = random_parameters(inst, args.frames, rng)
    counts = to_counts(simulate(*params.T, inst), 7.0, scale=1.0, rng=rng)
    bound = np.sqrt(np.mean(crlb(*params[:300].T, inst) ** 2, axis=0))

    rows = {}
    for name, recipe in ARCHITECTURES.items():
        rate = _training_rate(recipe)
        # Fill the budget: a fifth of the time goes to simulation and validation.
        frames = int(0.8 * rate * args.minutes * 60)
        epochs = 10
        budgeted = recipe.replace(epochs=epochs,
                                  frames_per_epoch=max(recipe.batch_size, frames // epochs),
                                  pool_size=min(200_000, max(20_000, frames // 5)),
                                  early_stopping_patience=None)
        start = time.perf_counter()
        result = train_member(budgeted, inst, seed=0, progress=False)
        train_s = time.perf_counter() - start
        meta = {**model_metadata(budgeted, inst, {}), "sha256": "benchmark"}
        predictor = Predictor.from_states([result.state_dict], meta)
        ds = predictor.predict(counts)
        rmse = np.array([np.sqrt(np.mean((ds[p].values - params[:, i]) ** 2))
                         for i, p in enumerate(PARAMETERS)])
        predictor.predict_arrays(counts[:256])
        start = time.perf_counter()
        predictor.predict_arrays(counts)
        infer = len(counts) / (time.perf_counter() - start)
        n_params = count_parameters(build_model(recipe.architecture, **recipe.architecture_kwargs))
        seen = budgeted.epochs * budgeted.frames_per_epoch
        rows[name] = (rmse / bound, infer, rate, seen, train_s, n_params)
        print(f"{name}: trained {train_s / 60:.1f} min on {rows[name][3]:,} frames", flush=True)

    print(f"\nSame recipe, {args.minutes:g} min of training each, {args.threads} threads; "
          f"{args.frames} off-grid test frames at 7 counts")
    print(f"{'network':<22}{'params':>10}{'train fr/s':>12}{'frames seen':>13}"
          f"{'RMSE/CRLB ε':>13}{'ω':>7}{'χ':>7}{'infer fr/s':>12}")
    for name, (ratio, infer, rate, seen, _, n_params) in rows.items():
        print(f"{name:<22}{n_params:>10,}{rate:>12,.0f}{seen:>13,}{ratio[0]:>13.2f}{ratio[1]:>7.2f}"
              f"{ratio[2]:>7.2f}{infer:>12,.0f}")
    (paper, ours) = rows.values()
    ratio = ours[0] / paper[0]
    print(f"\nours / paper: inference {ours[1] / paper[1]:.1f}x faster; RMSE ratio ε {ratio[0]:.2f}, "
          f"ω {ratio[1]:.2f}, χ {ratio[2]:.2f} (below 1: ours more accurate)")


if __name__ == "__main__":
    main()
