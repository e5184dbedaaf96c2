"""Accuracy against wall-clock training time: today's recipe and the one-command plan, side by side.

    python benchmarks/training.py [--instrument docs/example-instrument.yaml] [--minutes 15 30 60]
                                  [--arms today new] [--frames 2000] [--results FILE] [--png FILE]
                                  [--refine tilts|strain] [--workdir DIR [--rescore]]

Two arms, trained on this machine one after the other (never at the same time):

* **today**: the two commands documented before issue 19 -- ``nanobeam train --recipe default``
  (2 members x 30 epochs x 500,000 frames) then ``--recipe registered --base`` (2 x 10 epochs) --
  with the training noise of that time (``torch.poisson`` in threads, the mask fill as four
  convolutions; copied below as ``_today_*``). It does not plan for a budget, so it runs once, for
  the longest time asked, and is paused (SIGSTOP) at each earlier time while its checkpoints are
  copied: the model at time t is the members finished by then plus the running member's best
  epoch so far (coarse stage alone until the refining stage has a member).
* **new**: ``nanobeam train --time-budget Tm`` (both stages planned for T, the compiled noise), one
  run per time T; the point is plotted at the time the command really took. ``--device cuda``
  (with ``--arms new``): the same on a GPU, the training pool simulated there, stored as
  ``new-cuda``. ``--refine strain``: the same with the command's ``--refine strain`` (its refining
  stage refines strain too), stored as ``new-strain``.

Every model is scored the same way, the networks alone (``predict(check=False)``: what training
makes) and through the whole ``predict()`` (networks, likelihood step, physics check: what a user
gets; RMSE over the frames without a per-frame flag, and their share: the scan-level test that
all frames share one film is left out, as the departure frames draw a film each on purpose), on
fresh off-grid frames of the instrument: ``ideal`` (its film, 7 counts at the Laue maximum) and
``departures`` (film within ±35 %, a flat background up to 0.12 counts per pixel, a third of the
frames with a module gap and dead pixels filled as ``predict()`` fills them, count level
x0.5-x3). RMSE / CRLB uses the RMS
Cramér–Rao bound of the ideal problem at 7 counts over the parameter box (as the model files do),
from the pixels the instrument observes: those it declares dead (``detector_mask_*``, the
example's module gap through the frame's centre) carry no information.
The shipped default model is scored on the same kinds of frames of the default instrument: the
goal is within 1.1x its RMSE / CRLB on every parameter at 60 min.

A step-rate check runs first (seconds): steps/s of the default recipe's training step with
today's noise and with the compiled noise, and their ratio.

Results are merged into ``--results`` (JSON, keyed by instrument, arm and minutes), so a long
comparison can be run in parts (``--arms new --minutes 60`` now, ``--arms today`` later); the
table and the picture (``--png``) show everything stored for the instrument. ``--rescore
--workdir DIR`` trains nothing: it scores again the models an earlier run kept in DIR.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nanobeam_bluesky._schema import Flag
from nanobeam_bluesky.inference import Predictor, load_pretrained
from nanobeam_bluesky.physics import PARAMETERS, Instrument, simulate
from nanobeam_bluesky.training import DEFAULT_RECIPE, REGISTERED_RECIPE
from nanobeam_bluesky.training import data as training_data
from nanobeam_bluesky.training.data import fill_masked_frames, masked_like_predict, masks_from_draws
from nanobeam_bluesky.training.ensemble import _refined_metadata, model_metadata
from nanobeam_bluesky.training.trainer import crlb_reference

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.1
TODAY_COARSE = DEFAULT_RECIPE.replace(epochs=30)
TODAY_REFINER = REGISTERED_RECIPE  # 10 epochs, the recipe's own registration jitter
TODAY_MEMBERS = 2


# --- today's training noise (before issue 19), for the "today" arm and the step-rate check ---------
_TODAY_THREADS = max(1, min(4, torch.get_num_threads()))


@functools.cache
def _today_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(_TODAY_THREADS, thread_name_prefix="poisson")


def _today_noisy_counts(noise_free, max_counts, augmentation, generator, background_max=0.0):
    expected = noise_free.float() * max_counts
    low, high = augmentation
    if high > low:
        u = torch.rand((len(expected), 1, 1), generator=generator)
        expected = expected * torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    elif low != 1.0:
        expected = expected * low
    if background_max > 0:
        expected = expected + background_max * torch.rand((len(expected), 1, 1), generator=generator)
    if len(expected) < 2 * _TODAY_THREADS:
        return torch.poisson(expected, generator=generator)
    seeds = torch.randint(0, 2**62, (_TODAY_THREADS,), generator=generator).tolist()
    parts = expected.chunk(_TODAY_THREADS)
    draws = _today_pool().map(
        lambda args: torch.poisson(args[0], generator=torch.Generator().manual_seed(args[1])),
        zip(parts, seeds, strict=True),
    )
    return torch.cat(list(draws))


def _today_masked_like_predict(counts, fraction, generator, fixed=None):
    if fraction <= 0 and fixed is None:
        return counts
    draws = torch.rand((len(counts), 8), generator=generator)
    masks = masks_from_draws(draws, fraction, counts.shape[-1])
    if fixed is not None:  # the instrument's declared mask: a fix both recipes get
        masks |= torch.as_tensor(fixed, dtype=torch.bool)
    chosen = torch.nonzero(masks.flatten(1).any(1)).flatten()
    return fill_masked_frames(counts, masks, chosen) if len(chosen) else counts


def use_todays_noise() -> None:
    """Training in this process draws its noise as before issue 19."""
    training_data.noisy_counts = _today_noisy_counts  # type: ignore[assignment]
    training_data.masked_like_predict = _today_masked_like_predict  # type: ignore[assignment]


# --- scoring --------------------------------------------------------------------------------------
@functools.cache
def test_frames(instrument: Instrument, kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts (n, F, F), truth (n, 3)) of fresh off-grid frames: ``ideal`` or ``departures``."""
    rng = np.random.default_rng([2027, 19, n, 0 if kind == "ideal" else 1])
    params = np.stack([rng.uniform(lo, hi, n) for lo, hi in instrument.parameter_ranges.values()], 1)
    if kind == "ideal":
        expected = 7.0 * simulate(*params.T, instrument)
        return rng.poisson(expected).astype(np.float32), params
    film = instrument.film_thickness_angstrom * (1 + rng.uniform(-0.35, 0.35, n))
    level = np.exp(rng.uniform(math.log(0.5), math.log(3.0), n))[:, None, None]
    expected = 7.0 * level * simulate(*params.T, instrument, thickness_angstrom=film)
    expected = expected + rng.uniform(0, 0.12, (n, 1, 1))
    counts = torch.as_tensor(rng.poisson(expected).astype(np.float32))
    counts = masked_like_predict(counts, 0.3, torch.Generator().manual_seed(int(rng.integers(2**62))))
    return counts.numpy(), params


KINDS = ("ideal", "departures")
#: The same frames through the whole ``predict()``: its scores are stored under "<kind> predict".
PREDICT = " predict"
#: The scan-level test that the frames share one film: the departure frames draw a film each on
#: purpose, so it says "mismatch" of them as a set; the per-frame flags still apply.
_SET_FLAGS = Flag.POOLED_MISMATCH


def score(predictor: Predictor, instrument: Instrument, n: int) -> dict[str, dict[str, float]]:
    """RMSE / CRLB per parameter on each kind of frames: the networks alone (``kind``) and the
    whole ``predict()`` on its unflagged frames (``kind predict``, with their share)."""
    bound = crlb_reference(instrument, 7.0)
    scores = {}
    for kind in KINDS:
        counts, truth = test_frames(instrument, kind, n)
        for check in (False, True):
            ds = predictor.predict(counts, check=check, check_instrument=False)
            pred = np.stack([ds[name].values for name in PARAMETERS], 1)
            kept = (
                (ds["flag"].values.astype(np.int64) & ~int(_SET_FLAGS)) == 0
                if check
                else np.ones(len(pred), bool)
            )
            rmse = np.sqrt(np.nanmean((pred[kept] - truth[kept]) ** 2, axis=0))
            key = kind + PREDICT if check else kind
            scores[key] = {name: float(r / b) for name, r, b in zip(PARAMETERS, rmse, bound, strict=True)}
            if check:
                scores[key]["unflagged"] = float(kept.mean())
    return scores


# --- the "today" arm: two commands in a child process, paused for snapshots -------------------------
def today_worker(instrument_path: str, workdir: Path) -> None:
    """The child: today's two commands (as library calls), today's noise."""
    from nanobeam_bluesky.training import train_ensemble

    use_todays_noise()
    instrument = Instrument.load(instrument_path)
    coarse = workdir / "coarse.pt"
    train_ensemble(
        TODAY_COARSE, TODAY_MEMBERS, coarse, instrument, workdir=workdir / "coarse", progress=False
    )
    train_ensemble(
        TODAY_REFINER,
        TODAY_MEMBERS,
        workdir / "model.pt",
        instrument,
        workdir=workdir / "refiner",
        base=coarse,
        progress=False,
    )


def _copy_snapshot(workdir: Path, to: Path) -> None:
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(workdir, to, ignore=shutil.ignore_patterns("*.csv", "*.json"))


def _loadable(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except Exception:
        return False
    return True


def _members(stage_dir: Path) -> list[dict]:
    """The state dicts of a stage's finished members and its running member's best epoch."""
    states = []
    for member in sorted(stage_dir.glob("member-*")):
        done, running = member / "member.pt", member / "checkpoint.pt"
        if done.exists():
            states.append(torch.load(done, weights_only=True)["state_dict"])
        elif running.exists():
            best = torch.load(running, weights_only=True)["best_model"]
            if best is not None:
                states.append(best)
    return states


def snapshot_predictor(snapshot: Path, instrument: Instrument) -> Predictor | None:
    """The model a snapshot of the today arm's workdir holds (None before its first epoch)."""
    from nanobeam_bluesky.models import load_model_file

    coarse_file = snapshot / "coarse.pt"
    refiners = _members(snapshot / "refiner") if coarse_file.exists() else []
    if refiners:
        base_states, base_meta = load_model_file(coarse_file)
        meta = _refined_metadata(base_meta, TODAY_REFINER, instrument, len(refiners), [], None)
        return Predictor.from_states(base_states + refiners, {**meta, "sha256": "snapshot"})
    if coarse_file.exists():
        return Predictor.from_file(coarse_file)
    coarse = _members(snapshot / "coarse")
    if not coarse:
        return None
    meta = model_metadata(TODAY_COARSE, instrument, {"members": []})
    return Predictor.from_states(coarse, {**meta, "sha256": "snapshot"})


def run_today(instrument_path: str, minutes: list[float], workdir: Path, n: int) -> dict[str, dict]:
    work = workdir / "today"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    child = subprocess.Popen(
        [sys.executable, __file__, "--today-worker", "--instrument", instrument_path, "--workdir", str(work)]
    )
    trained, snapshots = 0.0, {}
    try:
        for t in sorted(minutes):
            # Only the child's running time counts: the copies below happen while it is stopped.
            start = time.perf_counter()
            while trained + (time.perf_counter() - start) < t * 60 and child.poll() is None:
                time.sleep(min(5.0, max(0.1, t * 60 - trained - (time.perf_counter() - start))))
            trained += time.perf_counter() - start
            if child.poll() is None:
                child.send_signal(signal.SIGSTOP)
            to = workdir / f"today-at-{t:g}min"
            for _ in range(20):  # a checkpoint caught mid-write: let the child finish it
                _copy_snapshot(work, to)
                if all(_loadable(p) for p in to.rglob("*.pt")):
                    break
                child.send_signal(signal.SIGCONT)
                time.sleep(0.5)
                trained += 0.5
                child.send_signal(signal.SIGSTOP)
            snapshots[t] = (to, trained)
            print(f"today: snapshot at {trained / 60:.1f} min of training", flush=True)
            if child.poll() is None:
                child.send_signal(signal.SIGCONT)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    instrument = Instrument.load(instrument_path)
    results = {}
    for t, (snap, trained_s) in snapshots.items():
        predictor = snapshot_predictor(snap, instrument)
        if predictor is None:
            print(f"today: no epoch finished by {trained_s / 60:.1f} min: no model yet", flush=True)
            continue
        results[f"{t:g}"] = {"wall_min": trained_s / 60, "scores": score(predictor, instrument, n)}
    return results


# --- the "new" arm --------------------------------------------------------------------------------
def run_new(
    instrument_path: str,
    minutes: list[float],
    workdir: Path,
    n: int,
    device: str = "cpu",
    refine: str = "tilts",
) -> dict[str, dict]:
    instrument = Instrument.load(instrument_path)
    results = {}
    for t in minutes:
        out, work = workdir / f"new-{t:g}min.pt", workdir / f"new-{t:g}min.work"
        shutil.rmtree(work, ignore_errors=True)
        out.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "nanobeam_bluesky.cli", "train", "--instrument", instrument_path,
            "--out", str(out), "--workdir", str(work), "--time-budget", f"{t:g}m", "--device", device,
            "--refine", refine,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        print(f"new: {t:g} min budget took {wall / 60:.1f} min", flush=True)
        results[f"{t:g}"] = {"wall_min": wall / 60, "scores": score(Predictor.from_file(out), instrument, n)}
    return results


def rescore(workdir: Path, instrument: Instrument, n: int, stored: dict) -> None:
    """Score again the models an earlier run kept in ``workdir`` (``new-<T>min.pt``, the today
    arm's ``today-at-<T>min`` snapshots), keeping the wall times ``stored`` has for them."""
    kept = [("new", out, out.name[4:-6]) for out in sorted(workdir.glob("new-*min.pt"))]
    kept += [("today", snap, snap.name[9:-3]) for snap in sorted(workdir.glob("today-at-*min"))]
    for arm, path, minutes in kept:
        entry = stored.get(arm, {}).get(minutes)
        if entry is None:
            print(f"rescore: {path} has no stored wall time (arm {arm}, {minutes} min): skipped")
            continue
        predictor = Predictor.from_file(path) if arm == "new" else snapshot_predictor(path, instrument)
        if predictor is not None:
            entry["scores"] = score(predictor, instrument, n)
            print(f"rescore: {arm} at {minutes} min from {path}", flush=True)


# --- step rate --------------------------------------------------------------------------------------
def step_rates(steps: int = 40) -> tuple[float, float]:
    """Training steps/s of the default recipe with today's noise and with the compiled noise."""
    from nanobeam_bluesky.models import build_model
    from nanobeam_bluesky.training.trainer import objective_for

    instrument = Instrument()
    recipe = DEFAULT_RECIPE.replace(pool_size=8192, frames_per_epoch=steps * 256, validation_frames=256)
    data = training_data.OnTheFlyData(instrument, recipe, seed=0)
    data.prepare(0)
    objective = objective_for(recipe, instrument)
    rates = []
    for noise, masks in (
        (_today_noisy_counts, _today_masked_like_predict),
        (training_data.noisy_counts, training_data.masked_like_predict),
    ):
        model = build_model(recipe.architecture, **{**recipe.architecture_kwargs, **objective.model_kwargs})
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        order = torch.randperm(len(data.frames), generator=generator)
        timed = 0.0
        for i in range(steps):
            start = time.perf_counter()
            idx = order[(i * 256) % (len(order) - 256) :][:256]
            x = noise(data.frames[idx], recipe.max_counts, recipe.count_augmentation, generator, 0.12)
            x = masks(x, recipe.mask_fraction, generator)
            out, target = objective.outputs_and_targets(model, x, data.labels[idx], generator)
            loss = (((out - target) ** 2) * objective.weights).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss.item()
            if i >= 5:
                timed += time.perf_counter() - start
        rates.append((steps - 5) / timed)
    return rates[0], rates[1]


# --- report ---------------------------------------------------------------------------------------
def report(stored: dict, shipped: dict, instrument_name: str) -> None:
    for suffix, what in (("", "networks alone"), (PREDICT, "whole predict(), unflagged frames")):
        kinds = [kind + suffix for kind in KINDS]
        print(f"\nRMSE / CRLB, {what}, {instrument_name} (shipped default on the default instrument)")
        header = f"{'arm':<10}{'min':>6}{'wall':>7}  " + "  ".join(
            f"{kind[:5]} {p[:6]:>6}" for kind in kinds for p in PARAMETERS
        )
        print(header + ("  unflagged" if suffix else ""))

        def row(arm: str, minutes: str, wall: float | None, scores: dict, kinds: list[str] = kinds) -> str:
            cells = "  ".join(f"{scores[kind][p]:12.2f}" for kind in kinds for p in PARAMETERS)
            if "unflagged" in scores[kinds[-1]]:
                cells += "  " + " ".join(f"{scores[kind]['unflagged']:.0%}" for kind in kinds)
            wall_text = f"{wall:7.1f}" if wall is not None else f"{'':>7}"
            return f"{arm:<10}{minutes:>6}{wall_text}  {cells}"

        if not all(kind in shipped for kind in kinds):
            print("(not scored: --rescore the kept model files)")
            continue
        print(row("shipped", "", None, shipped))
        for arm in [a for a in stored if a != "shipped"]:
            for minutes, result in sorted(stored.get(arm, {}).items(), key=lambda kv: float(kv[0])):
                if not all(kind in result["scores"] for kind in kinds):
                    continue
                print(row(arm, minutes, result["wall_min"], result["scores"]))
                worst = max(result["scores"][k][p] / shipped[k][p] for k in kinds for p in PARAMETERS)
                verdict = "meets" if worst <= GOAL else "misses"
                print(
                    f"{'':<10}{'':>6}{'':>7}  worst ratio to shipped {worst:.2f} ({verdict} the {GOAL}x goal)"
                )


def draw(stored: dict, png: Path) -> None:
    """Every instrument's arms in one picture (``stored``: instrument -> arm -> minutes -> result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shipped = next(iter(stored.values()))["shipped"]  # the same frames of the default instrument
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True, constrained_layout=True)
    for r, kind in enumerate(("ideal", "departures")):
        for c, p in enumerate(PARAMETERS):
            ax = axes[r, c]
            for colour, (instrument_name, arms) in zip(
                ("C0", "C1", "C2", "C3"), stored.items(), strict=False
            ):
                for arm, style in (("today", "o--"), ("new", "s-"), ("new-strain", "x:"), ("new-cuda", "^-")):
                    points = sorted((v["wall_min"], v["scores"][kind][p]) for v in arms.get(arm, {}).values())
                    if points:
                        ax.plot(
                            *zip(*points, strict=True), style, color=colour, label=f"{arm}, {instrument_name}"
                        )
            ax.axhline(shipped[kind][p], color="k", lw=1, label="shipped default")
            ax.axhline(GOAL * shipped[kind][p], color="k", lw=1, ls=":", label=f"{GOAL}x shipped")
            ax.axhline(1.0, color="grey", lw=0.8, ls="-.", label="Cramér–Rao bound")
            ax.set_yscale("log")
            ax.set_title(f"{p}, {kind} frames")
            if r == 1:
                ax.set_xlabel("training wall time on this machine (min)")
            if c == 0:
                ax.set_ylabel("RMSE / CRLB (networks alone)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Training for an instrument: accuracy against wall-clock time (recipe, instrument)")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--instrument",
        default=str(ROOT / "docs" / "example-instrument.yaml"),
        help="an instrument YAML, or 'default': the shipped model's own instrument",
    )
    parser.add_argument("--minutes", type=float, nargs="+", default=[15, 30, 60])
    parser.add_argument("--arms", nargs="+", choices=("today", "new"), default=["today", "new"])
    parser.add_argument("--frames", type=int, default=2000, help="test frames of each kind")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "training.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "training-curves.png")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--skip-step-rate", action="store_true")
    parser.add_argument(
        "--refine",
        choices=("tilts", "strain"),
        default="tilts",
        help="the new arm's --refine (strain: stored as the arm new-strain)",
    )
    parser.add_argument("--device", default="cpu", help="the new arm's --device (cuda: the GPU path)")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="train nothing: score again the models kept in --workdir by an earlier run",
    )
    parser.add_argument("--today-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.today_worker:
        today_worker(args.instrument, args.workdir)
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nanobeam-training-bench-"))
    if args.instrument == "default":  # the shipped model's own instrument: the same-instrument test
        workdir.mkdir(parents=True, exist_ok=True)
        args.instrument = str(workdir / "default-instrument.yaml")
        Instrument().save(args.instrument)
    instrument = Instrument.load(args.instrument)
    name = instrument.name or Path(args.instrument).stem
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, instrument {name}")
    if not args.skip_step_rate:
        today, new = step_rates()
        print(f"training steps/s (default recipe, batch 256): today's noise {today:.1f}, compiled {new:.1f}, "
              f"ratio {new / today:.2f}")  # fmt: skip
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    mine = stored.setdefault(name, {})
    shipped = mine["shipped"] = score(load_pretrained(), Instrument(), args.frames)
    if args.device != "cpu" and args.arms != ["new"]:
        parser.error("--device is for the new arm alone: give --arms new")
    if args.rescore:
        if args.workdir is None:
            parser.error("--rescore scores the models kept in --workdir: give it")
        rescore(workdir, instrument, args.frames, mine)
        args.results.write_text(json.dumps(stored, indent=1))
    for arm in [] if args.rescore else args.arms:
        if arm == "today":
            results = run_today(args.instrument, args.minutes, workdir, args.frames)
        else:
            results = run_new(args.instrument, args.minutes, workdir, args.frames, args.device, args.refine)
        key = arm + ("-strain" if arm == "new" and args.refine == "strain" else "")
        key = key if args.device == "cpu" else f"{key}-{args.device}"
        mine.setdefault(key, {}).update(results)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(stored, indent=1))  # after each arm: a long run keeps its part
    report(mine, shipped, name)
    draw(stored, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
