"""Accuracy per unit of CPU time: the paper's CNN against our MLP, same recipe, same time budget.

    python benchmarks/architectures.py [--minutes 10] [--threads 2]

Both networks are trained with our default recipe (on-the-fly off-grid frames, fresh noise,
count augmentation, cosine schedule) for the same wall-clock budget on this machine: each one's
training step (noise included) and the simulator are timed first, and its number of frames and
its pool are set so that steps plus pool simulation fill the budget; the minutes actually spent
are printed beside the results. Then both
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
from nanobeam_bluesky.training.data import noisy_counts

ARCHITECTURES = {
    "paper CNN": DEFAULT_RECIPE.replace(architecture="paper", architecture_kwargs={}),
    "ours (MLP 256-256)": DEFAULT_RECIPE,
}


def _training_rate(recipe, pool: torch.Tensor, steps: int = 30) -> float:
    """Training frames/s of the recipe's network: batch gather, Poisson noise, forward, backward, Adam."""
    model = build_model(recipe.architecture, **recipe.architecture_kwargs)
    optimiser = torch.optim.Adam(model.parameters())
    generator = torch.Generator().manual_seed(0)
    y = torch.zeros(recipe.batch_size, 3)
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        idx = torch.randint(0, len(pool), (recipe.batch_size,), generator=generator)
        x = noisy_counts(pool[idx], recipe.max_counts, recipe.count_augmentation, generator)[:, None]
        loss = ((model(x) - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return steps * recipe.batch_size / (time.perf_counter() - start)


def _fill_budget(recipe, rate: float, simulate_rate: float, budget_s: float, epochs: int = 10):
    """The recipe with as many frames as fit ``budget_s``: steps plus simulating the pool."""

    def plan(frames: int):
        pool = min(200_000, max(20_000, frames // 5))
        simulated = pool * (1 + recipe.pool_refresh_fraction * (epochs - 1))
        seconds = frames / rate + (simulated + 2 * recipe.validation_frames) / simulate_rate
        per_epoch = max(recipe.batch_size, frames // epochs)
        return seconds, recipe.replace(
            epochs=epochs, frames_per_epoch=per_epoch, pool_size=pool, early_stopping_patience=None
        )

    low, high = recipe.batch_size * epochs, int(rate * budget_s)
    while high - low > recipe.batch_size:
        mid = (low + high) // 2
        low, high = (mid, high) if plan(mid)[0] <= budget_s else (low, mid)
    return plan(low)[1]


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

    start = time.perf_counter()
    pool = simulate(*random_parameters(inst, 4000, rng).T, inst)
    simulate_rate = len(pool) / (time.perf_counter() - start)
    pool = torch.as_tensor(pool.astype(np.float16))

    rows = {}
    for name, recipe in ARCHITECTURES.items():
        rate = _training_rate(recipe, pool)
        budgeted = _fill_budget(recipe, rate, simulate_rate, 0.95 * args.minutes * 60)
        start = time.perf_counter()
        result = train_member(budgeted, inst, seed=0, progress=False)
        train_s = time.perf_counter() - start
        meta = {**model_metadata(budgeted, inst, {}), "sha256": "benchmark"}
        predictor = Predictor.from_states([result.state_dict], meta)
        ds = predictor.predict(counts)
        rmse = np.array(
            [np.sqrt(np.mean((ds[p].values - params[:, i]) ** 2)) for i, p in enumerate(PARAMETERS)]
        )
        predictor.predict_arrays(counts[:256])
        start = time.perf_counter()
        predictor.predict_arrays(counts)
        infer = len(counts) / (time.perf_counter() - start)
        n_params = count_parameters(build_model(recipe.architecture, **recipe.architecture_kwargs))
        seen = budgeted.epochs * budgeted.frames_per_epoch
        rows[name] = (rmse / bound, infer, rate, seen, train_s, n_params)
        print(f"{name}: trained {train_s / 60:.1f} min on {rows[name][3]:,} frames", flush=True)

    print(
        f"\nSame recipe, {args.minutes:g} min of training each, {args.threads} threads; "
        f"{args.frames} off-grid test frames at 7 counts"
    )
    print(
        f"{'network':<22}{'params':>10}{'train fr/s':>12}{'frames seen':>13}{'train min':>11}"
        f"{'RMSE/CRLB ε':>13}{'ω':>7}{'χ':>7}{'infer fr/s':>12}"
    )
    for name, (ratio, infer, rate, seen, train_s, n_params) in rows.items():
        print(
            f"{name:<22}{n_params:>10,}{rate:>12,.0f}{seen:>13,}{train_s / 60:>11.1f}{ratio[0]:>13.2f}"
            f"{ratio[1]:>7.2f}{ratio[2]:>7.2f}{infer:>12,.0f}"
        )
    (paper, ours) = rows.values()
    ratio = ours[0] / paper[0]
    print(
        f"\nours / paper: inference {ours[1] / paper[1]:.1f}x faster; RMSE ratio ε {ratio[0]:.2f}, "
        f"ω {ratio[1]:.2f}, χ {ratio[2]:.2f} (below 1: ours more accurate)"
    )


if __name__ == "__main__":
    main()
