"""One GPU session, sized to fit a 10-minute lease: inference speed and ensemble training on CUDA.

    OUT=results/ python benchmarks/gpu_session.py --budget-s 540 [--epochs 30] [--no-inference]

1. ``benchmarks/inference.py --device cuda`` (paper CNN, one of our networks, an ensemble).
2. Times a training step (GPU) and the simulator on 4 CPU threads, and, unless ``--epochs`` is
   given, picks the largest epoch count that lets four members, trained at once in four
   processes, finish inside the budget. (The estimate assumes the pool is simulated on the CPU,
   as it was before ``simulate_tensor``; with the pool on the GPU it is pessimistic: 4 x 30
   epochs took 293 s on an H200.)
3. Trains them (``nanobeam train --recipe default --members 1 --seed k --device cuda``) and joins
   them into one model file with the single command that would train all four in turn, which
   finds the finished members in its work folder and only assembles and scores them.

Everything lands in $OUT: the model file, metrics logs, and the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from nanobeam_bluesky.models import build_model
from nanobeam_bluesky.physics import Instrument, simulate
from nanobeam_bluesky.training import DEFAULT_RECIPE, random_parameters
from nanobeam_bluesky.training.data import noisy_counts

MEMBERS = 4
THREADS_PER_MEMBER = 4


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanobeam_bluesky.cli", *args]


def time_costs(device: str, recipe=DEFAULT_RECIPE) -> dict[str, float]:
    """Seconds to simulate one frame (CPU, 4 threads) and for one training step (GPU)."""
    torch.set_num_threads(THREADS_PER_MEMBER)
    inst = Instrument()
    params = random_parameters(inst, 4000, np.random.default_rng(0))
    simulate(*params[:200].T, inst)
    start = time.perf_counter()
    pool = simulate(*params.T, inst)
    sim_s = (time.perf_counter() - start) / len(params)

    frames = torch.as_tensor(pool.astype(np.float16))
    model = build_model(recipe.architecture, **recipe.architecture_kwargs).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.zeros((recipe.batch_size, 3), device=device)

    def steps(n: int) -> None:
        for _ in range(n):
            idx = torch.randint(0, len(frames), (recipe.batch_size,))
            x = noisy_counts(frames[idx].to(device), recipe.max_counts, recipe.count_augmentation, gen)
            loss = ((model(x[:, None]) - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()

    steps(50)
    start = time.perf_counter()
    steps(500)
    return {"simulate_s_per_frame": sim_s, "step_s": (time.perf_counter() - start) / 500}


def choose_epochs(costs: dict[str, float], budget_s: float, recipe=DEFAULT_RECIPE) -> int:
    # Four processes share the GPU and the CPU. Measured on an H200 host (16 CPUs): an epoch took
    # 15 s against 12.3 s predicted from the single-process costs, so 1.3 leaves a margin.
    contention = 1.3
    sim = costs["simulate_s_per_frame"] * contention
    setup = (recipe.pool_size + 2 * recipe.validation_frames) * sim + 20  # + imports, CUDA init
    steps_per_epoch = -(-recipe.frames_per_epoch // recipe.batch_size)
    per_epoch = (
        steps_per_epoch * costs["step_s"] * contention
        + recipe.pool_size * recipe.pool_refresh_fraction * sim
        + 1.0
    )
    return int(max(1, min(100, (budget_s - setup) // per_epoch)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=540, help="whole script, seconds")
    parser.add_argument("--model", default=None, help="ensemble for the inference benchmark")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per member (default: as many as fit the budget)"
    )
    parser.add_argument("--no-inference", action="store_true", help="skip the inference benchmark")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check this script on the CPU: tiny pool and epochs, no GPU needed",
    )
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    small = ["--pool-size", "2000", "--frames-per-epoch", "2000"] if args.smoke else []
    t0 = time.perf_counter()
    out = Path(os.environ.get("OUT", "gpu-session"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "session.txt"

    def note(text: str) -> None:
        print(text, flush=True)
        with log.open("a") as fh:
            fh.write(text + "\n")

    if not args.smoke:
        note(
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                capture_output=True,
                text=True,
            ).stdout
        )
    note(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    bench = [
        sys.executable,
        "benchmarks/inference.py",
        "--device",
        device,
        "--frames",
        "2048" if args.smoke else "65536",
        "--batch",
        "8192",
        "--threads",
        "16",
    ] + (["--model", args.model] if args.model else [])
    if not args.no_inference:
        bench_run = subprocess.run(bench, capture_output=True, text=True)
        note(bench_run.stdout + bench_run.stderr[-2000:])

    costs = time_costs(device)
    elapsed = time.perf_counter() - t0
    epochs = 2 if args.smoke else args.epochs or choose_epochs(costs, args.budget_s - elapsed - 60)
    note(f"costs {json.dumps(costs)}; elapsed {elapsed:.0f} s -> {epochs} epochs per member")

    work = Path("/tmp/gpu-ensemble")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS_PER_MEMBER), "PYTHONUNBUFFERED": "1"}
    procs = []
    for k in range(MEMBERS):
        cmd = _cli(
            "train",
            "--recipe",
            "default",
            "--members",
            "1",
            "--seed",
            str(k),
            "--epochs",
            str(epochs),
            "--device",
            device,
            "--out",
            f"/tmp/member-{k}.pt",
            "--workdir",
            str(work / f"seed-{k}"),
            *small,
        )
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/train-{k}.log", "w"))
        )
    deadline = t0 + args.budget_s - 45
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.perf_counter()))
        note(
            f"members trained (exit codes {[p.returncode for p in procs]}); "
            f"elapsed {time.perf_counter() - t0:.0f} s"
        )
        join(work, epochs, device, small, out, note)
    finally:
        for p in procs:
            p.kill()
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for k in range(MEMBERS):
                metrics = work / f"seed-{k}" / "member-0" / "metrics.csv"
                if metrics.exists():
                    tar.add(metrics, arcname=f"member-{k}/metrics.csv")
                tar.add(f"/tmp/train-{k}.log", arcname=f"member-{k}/train.log")
        note(f"done in {time.perf_counter() - t0:.0f} s")


def join(work: Path, epochs: int, device: str, small: list[str], out: Path, note) -> None:
    joined = work / "joined"
    for k in range(MEMBERS):
        (joined / f"member-{k}").mkdir(parents=True, exist_ok=True)
        for name in ("member.pt", "metrics.csv"):
            shutil.copy(work / f"seed-{k}" / "member-0" / name, joined / f"member-{k}" / name)
    result = subprocess.run(
        _cli(
            "train",
            "--recipe",
            "default",
            "--members",
            str(MEMBERS),
            "--epochs",
            str(epochs),
            "--device",
            device,
            "--out",
            str(out / "nanobeam-default-cuda.pt"),
            "--workdir",
            str(joined),
            *small,
        ),
        capture_output=True,
        text=True,
    )
    note(result.stdout + result.stderr[-2000:])


if __name__ == "__main__":
    main()
