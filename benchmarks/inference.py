"""Inference speed on this machine: the paper CNN, one of our networks, and the shipped model.

    python benchmarks/inference.py [--model FILE] [--frames 16384] [--threads 2]

All three run on the same Poisson frames in one process, batched, in inference mode; printed as
frames/s with the ratio to the paper model. "predict()" is the default: plausibility checks, the
networks, the likelihood step and the physics check, flags and the xarray result;
"predict(check=False)" is the networks alone with input checks (what predict() was before the
physics check). A two-stage model is also timed without its refining stage.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nanobeam_bluesky.inference import Predictor, load_pretrained
from nanobeam_bluesky.models import PaperCNN, build_model
from nanobeam_bluesky.physics import simulate, to_counts
from nanobeam_bluesky.training import random_parameters


def _rate(fn, n: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU kernels run asynchronously: time their completion
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--frames", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = (
        Predictor.from_file(args.model, device=args.device)
        if args.model
        else load_pretrained(device=args.device)
    )
    inst = predictor.instrument
    params = random_parameters(inst, 512, np.random.default_rng(0))
    base = to_counts(simulate(*params.T, inst), 7.0, scale=1.0, rng=0)
    frames = np.ascontiguousarray(np.resize(base, (args.frames, 64, 64)))
    x = torch.as_tensor(frames).to(args.device)

    paper = PaperCNN().eval().to(args.device)
    arch = predictor.metadata["architecture"]
    single = build_model(arch["name"], **arch.get("kwargs", {})).eval().to(args.device)

    start = predictor.predict_arrays(frames)[0]  # the networks' estimates, for the check alone

    @torch.inference_mode()
    def run(model):
        for i in range(0, len(x), args.batch):
            model(x[i : i + args.batch, None])

    k = f"K={predictor.n_members}" + (f"+{predictor.n_refiners} refining" if predictor.n_refiners else "")
    rates = {
        "paper CNN (1 network)": _rate(lambda: run(paper), len(x)),
        f"ours: {arch['name']} (1 network)": _rate(lambda: run(single), len(x)),
        f"shipped, forward ({k})": _rate(lambda: predictor.predict_arrays(frames), len(x)),
        f"shipped, predict(check=False) ({k})": _rate(lambda: predictor.predict(frames, check=False), len(x)),
        f"shipped, predict(), all checks ({k})": _rate(lambda: predictor.predict(frames), len(x)),
        "the physics check alone (likelihood step)": _rate(
            lambda: predictor.physics_check()(frames, start), len(x)
        ),
    }
    if predictor.n_refiners:
        rates[f"shipped, coarse stage only (K={predictor.n_members})"] = _rate(
            lambda: predictor.predict(frames, refine=False), len(x)
        )
    print(f"{args.frames} frames, batch {args.batch}, {args.threads} threads, device {args.device}")
    paper_rate = rates["paper CNN (1 network)"]
    for name, rate in rates.items():
        print(f"{name:<58}{rate:>12,.0f} frames/s{rate / paper_rate:>8.1f}x paper")


if __name__ == "__main__":
    main()
