"""One command for both stages: the coarse ensemble, then its refining stage, within a time budget.

:func:`plan_two_stage` times a few real training steps of each stage on this machine and splits
the budget into members, epochs and frames per epoch; :func:`train_two_stage` runs the plan, with
one progress bar (and its ETA) over all of it, resumable from its ``workdir``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..models import build_model
from ..physics import Instrument, simulate
from .data import OnTheFlyData
from .recipes import DEFAULT_RECIPE, REGISTERED_RECIPE, Recipe
from .trainer import objective_for

__all__ = [
    "MIN_COARSE_EPOCHS",
    "MIN_FRAMES_PER_EPOCH",
    "MIN_REFINER_EPOCHS",
    "StageRates",
    "TwoStagePlan",
    "check_resume_overrides",
    "check_roi_holds",
    "load_plan",
    "measure_rates",
    "parse_duration",
    "plan_two_stage",
    "replan",
    "save_plan",
    "train_two_stage",
]

#: The share of the budget given to the coarse stage (the shipped default spent 84 % there: 2 x 33
#: min coarse, 2 x 6 min refining).
COARSE_SHARE = 0.8
#: The smallest plan worth training: 3 coarse epochs (warm-up, then a cosine decay to converge on)
#: and 2 refining epochs, each of at least this many frames. Below that a member sees fewer frames
#: than the 41^3 grid library holds once, and the coarse stage's error is too large to register on.
MIN_COARSE_EPOCHS = 3
MIN_REFINER_EPOCHS = 2
MIN_FRAMES_PER_EPOCH = 20_000
#: Epochs aimed for when the budget allows (the shipped default's: 14 coarse, 3 refining).
TARGET_COARSE_EPOCHS = 14
TARGET_REFINER_EPOCHS = 3
#: Budget from which each stage trains two members (ensemble spread, 2 % better strain).
TWO_MEMBERS_FROM_S = 20 * 60
#: The share of the budget planned at the timed rates: they are short bursts (the pool's fastest of
#: three), and sustained training on the 2-core CPU ran 12-15 % slower (a 2 min budget took 2 min
#: 17 s, another 2 min 18 s), so the plan leaves that margin.
SUSTAINED_SHARE = 0.88
#: The share of what is left of the budget that a re-plan fills: its rate is the one a finished
#: member sustained, which the next one repeats to within a few per cent.
REPLAN_SHARE = 0.97
#: The ROI must hold at least this fraction of a frame's intensity at every edge of the box.
MIN_INTENSITY_IN_ROI = 0.7


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``45m``, ``1h``, ``1.5h`` (a bare number is minutes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)?\s*", text)
    if match is None:
        raise InputError(f"time budget {text!r}: give a duration such as 90s, 45m, 1h or 1.5h")
    unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 60}[match.group(2)]
    seconds = float(match.group(1)) * unit
    if seconds <= 0:
        raise InputError(f"time budget {text!r} must be positive")
    return seconds


def check_roi_holds(instrument: Instrument, min_fraction: float = MIN_INTENSITY_IN_ROI) -> None:
    """Refuse an instrument whose diffraction falls off the model's ROI at the box's edges.

    Simulates the box's corners, edge and face centres on a ROI twice as wide (same binning) and
    measures the share of each frame's intensity that the instrument's ROI holds.
    """
    wide = dataclasses.replace(instrument, roi_pixels=2 * instrument.roi_pixels)
    side = instrument.frame_pixels
    ranges = list(instrument.parameter_ranges.values())
    points = np.array(list(itertools.product(*[(lo, (lo + hi) / 2, hi) for lo, hi in ranges])))
    frames = simulate(points[:, 0], points[:, 1], points[:, 2], wide, upsample=2).astype(np.float64)
    lo = side // 2
    total = frames.sum(axis=(1, 2))
    inside = frames[:, lo : lo + side, lo : lo + side].sum(axis=(1, 2))
    share = np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)
    worst = int(np.argmin(share))
    if share[worst] >= min_fraction:
        return
    strain, omega, chi = points[worst]
    frame = frames[worst]
    where = ""
    if total[worst] > 0:
        rows, cols = np.nonzero(frame > 1e-3 * frame.max())
        where = (
            f"; its lit pixels span rows {rows.min() - lo}..{rows.max() - lo} and columns "
            f"{cols.min() - lo}..{cols.max() - lo} of the ROI's 0..{side - 1}"
        )
    raise InputError(
        f"the {side}x{side} ROI cannot hold this instrument's frames: at the box edge strain "
        f"{strain:.4g}, omega {omega:.4g} deg, chi {chi:.4g} deg only {100 * share[worst]:.0f} % of the "
        f"frame's intensity lands in the ROI (at least {100 * min_fraction:.0f} % needed){where}. Use "
        f"a larger ROI or more binning (roi_pixels {instrument.roi_pixels}, binning {instrument.binning}), "
        "a shorter detector distance, or a smaller parameter box"
    )


@dataclass(frozen=True)
class StageRates:
    """Measured on this machine: seconds per training step and per simulated frame."""

    step_s: float
    frame_s: float

    def member_seconds(self, recipe: Recipe) -> float:
        """Estimated time of one member: its pool, its refreshes, its steps, its held-out frames."""
        steps = recipe.epochs * math.ceil(recipe.frames_per_epoch / recipe.batch_size)
        refreshed = recipe.pool_size * (1 + recipe.pool_refresh_fraction * (recipe.epochs - 1))
        simulated = refreshed + 2 * recipe.validation_frames
        evaluation = recipe.epochs * recipe.validation_frames / recipe.batch_size * self.step_s / 3
        return steps * self.step_s + simulated * self.frame_s + evaluation


def measure_rates(
    recipe: Recipe, instrument: Instrument, device: str = "cpu", steps: int = 6, frames: int = 256
) -> StageRates:
    """Times ``frames`` simulated frames and ``steps`` training steps (after one warm-up step)."""
    probe = recipe.replace(
        pool_size=frames, pool_refresh_fraction=1.0, frames_per_epoch=(steps + 1) * recipe.batch_size
    )
    data = OnTheFlyData(instrument, probe, seed=12_345, device=device)
    data.prepare(0)
    # The first few large simulations in a process can be 10x slower than the steady state (fresh
    # memory): the fastest of three more.
    timings = []
    for epoch in (1, 2, 3):
        start = time.perf_counter()
        data.prepare(epoch)
        timings.append(time.perf_counter() - start)
    frame_s = min(timings) / frames
    objective = objective_for(probe, instrument)
    kwargs = {**probe.architecture_kwargs, **objective.model_kwargs}
    model = build_model(probe.architecture, **kwargs).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=probe.learning_rate)
    weights = objective.weights.to(device)
    generators = (torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(1))
    timed = 0.0
    for i, (x, y) in enumerate(data.batches(0, generators, device)):
        start = time.perf_counter()
        out, target = objective.outputs_and_targets(model, x, y, generators[1])
        loss = (((out - target) ** 2) * weights).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss.item()
        if i > 0:  # the first step warms up the allocator and kernels
            timed += time.perf_counter() - start
    # The batches' noise is drawn inside the iterator, outside the timed span: add it by timing one.
    start = time.perf_counter()
    next(iter(data.batches(0, generators, device)))
    noise_s = time.perf_counter() - start
    return StageRates(step_s=timed / steps + noise_s, frame_s=frame_s)


@dataclass(frozen=True)
class TwoStagePlan:
    """What a time budget buys: each stage's recipe and members, and the time they should take."""

    coarse: Recipe
    coarse_members: int
    refiner: Recipe
    refiner_members: int
    coarse_rates: StageRates
    refiner_rates: StageRates
    budget_s: float
    #: Seconds outside the members' training: the step timing, scoring the stored ensembles.
    overhead_s: float = 0.0
    #: The stage recipes the plan was cut from (the most epochs, frames and pool a member may
    #: have): a re-plan re-fits within them. None: the sizes were given (``--epochs`` ...) and stay.
    limits: tuple[Recipe, Recipe] | None = None
    #: Members re-fitted after a finished one measured the sustained rate: (stage, k, recipe),
    #: stage "coarse" or "refiner".
    replanned: tuple[tuple[str, int, Recipe], ...] = ()
    #: Seconds the finished members took, and how many members (in training order) those are.
    spent_s: float = 0.0
    finished: int = 0
    #: Real seconds per timed second, as the last finished member ran (None: not yet measured).
    rate_scale: float | None = None

    def recipe_for(self, stage: str, k: int) -> Recipe:
        """Member ``k``'s recipe in ``stage`` ("coarse" or "refiner")."""
        for name, j, recipe in self.replanned:
            if (name, j) == (stage, k):
                return recipe
        return self.coarse if stage == "coarse" else self.refiner

    def members(self) -> list[tuple[str, int]]:
        """(stage, k) of every member, in training order."""
        return [("coarse", k) for k in range(self.coarse_members)] + [
            ("refiner", k) for k in range(self.refiner_members)
        ]

    def _rates(self, stage: str) -> StageRates:
        return self.coarse_rates if stage == "coarse" else self.refiner_rates

    @property
    def estimate_s(self) -> float:
        """Seconds the whole plan should take: the finished members' own, the rest at the rate
        measured (before any member has finished: the timed rate less the sustained margin)."""
        rest = self.members()[self.finished :]
        training_s = sum(self._rates(s).member_seconds(self.recipe_for(s, k)) for s, k in rest)
        scale = 1 / SUSTAINED_SHARE if self.rate_scale is None else self.rate_scale
        return self.overhead_s + self.spent_s + training_s * scale

    def member_steps(self, stage: str, k: int) -> int:
        """Training steps of member ``k`` of ``stage``."""
        recipe = self.recipe_for(stage, k)
        return recipe.epochs * _steps(recipe)

    @property
    def total_steps(self) -> int:
        return sum(self.member_steps(s, k) for s, k in self.members())

    def describe(self) -> str:
        def stage(name: str, key: str, members: int, rates: StageRates) -> str:
            recipes = [self.recipe_for(key, k) for k in range(members)]
            each = [f"{r.epochs} epochs x {r.frames_per_epoch:,} frames" for r in recipes]
            sizes = f"{members} member(s) x {each[0]}" if len(set(each)) == 1 else " + ".join(each)
            scale = self.rate_scale or 1.0  # the rate measured, once a member has finished
            minutes = scale * sum(rates.member_seconds(r) for r in recipes) / 60
            return (
                f"{name}: {sizes} (pool {recipes[0].pool_size:,}; {1 / rates.step_s / scale:.0f} steps/s of "
                f"{recipes[0].batch_size}, ~{minutes:.1f} min)"
            )

        return "\n".join(
            [
                f"time budget {self.budget_s / 60:.1f} min, estimated {self.estimate_s / 60:.1f} min:",
                "  " + stage("coarse", "coarse", self.coarse_members, self.coarse_rates),
                "  " + stage("refining", "refiner", self.refiner_members, self.refiner_rates),
            ]
        )


def replan(plan: TwoStagePlan, stage: str, k: int, member_s: float) -> tuple[TwoStagePlan, str | None]:
    """The plan once member ``k`` of ``stage`` has trained in ``member_s`` seconds, and a line
    saying what changed (None: nothing).

    The members still to train are re-fitted (within :attr:`TwoStagePlan.limits`) to what is left
    of the budget, at the rate this member sustained: the bursts timed before training are
    10-30 % off that rate, either way, so a plan fitted to them alone ends early or late. A member
    the plan already counts as finished changes nothing: a saved plan re-run from the start (to
    re-make its model elsewhere) trains the sizes it recorded.
    """
    order = plan.members()
    index = order.index((stage, k))
    if index < plan.finished:
        # Already accounted for: the plan was saved after this member (a copied plan.json, re-run
        # to re-make its model): its sizes stand.
        return plan, None
    spent = plan.spent_s + member_s
    remaining = order[index + 1 :]
    scale = member_s / plan._rates(stage).member_seconds(plan.recipe_for(stage, k))
    after = dataclasses.replace(plan, spent_s=spent, finished=index + 1, rate_scale=scale)
    if plan.limits is None or not remaining or member_s <= 0:
        return after, None
    scaled = {
        name: StageRates(rates.step_s * scale, rates.frame_s * scale)
        for name, rates in (("coarse", plan.coarse_rates), ("refiner", plan.refiner_rates))
    }
    left = (plan.budget_s - plan.overhead_s - spent) * REPLAN_SHARE
    current = {m: scaled[m[0]].member_seconds(plan.recipe_for(*m)) for m in remaining}
    limits = dict(zip(("coarse", "refiner"), plan.limits, strict=True))
    targets = {
        "coarse": (TARGET_COARSE_EPOCHS, MIN_COARSE_EPOCHS),
        "refiner": (TARGET_REFINER_EPOCHS, MIN_REFINER_EPOCHS),
    }
    replanned = dict(((s, j), r) for s, j, r in plan.replanned)
    for member, seconds in current.items():
        name = member[0]
        share = max(left, 0.0) * seconds / sum(current.values())  # each keeps its share of the rest
        fitted = _fit_stage(limits[name], scaled[name], share, *targets[name])
        if fitted is None:  # behind schedule: the smallest useful member
            limit = limits[name]
            frames = min(MIN_FRAMES_PER_EPOCH, limit.frames_per_epoch)
            fitted = limit.replace(
                epochs=min(targets[name][1], limit.epochs),
                frames_per_epoch=frames,
                pool_size=_pool(limit, frames),
                validation_frames=min(1024, limit.validation_frames),
            )
        replanned[member] = fitted
    after = dataclasses.replace(
        after,
        replanned=tuple(
            (s, j, r) for (s, j), r in sorted(replanned.items(), key=lambda kv: order.index(kv[0]))
        ),
    )
    changed = [m for m in remaining if after.recipe_for(*m) != plan.recipe_for(*m)]
    if not changed:
        return after, None
    names = {"coarse": "coarse", "refiner": "refining"}
    what = "; ".join(
        f"{names[s]} member {j}: {after.recipe_for(s, j).epochs} epochs x "
        f"{after.recipe_for(s, j).frames_per_epoch:,} frames"
        for s, j in changed
    )
    return after, (
        f"re-planned: {names[stage]} member {k} took {member_s / 60:.1f} min, {scale:.2f}x the timed "
        f"estimate; {max(plan.budget_s - plan.overhead_s - spent, 0) / 60:.1f} min left: {what}"
    )


def _fit_stage(
    recipe: Recipe, rates: StageRates, seconds: float, target_epochs: int, min_epochs: int
) -> Recipe | None:
    """The recipe whose member fits ``seconds``: most epochs up to ``target_epochs`` (more when the
    frames per epoch reach the recipe's), frames per epoch to fill the rest; None if none fits."""
    validation = recipe.validation_frames if seconds >= 10 * 60 else min(1024, recipe.validation_frames)
    # A recipe smaller than the plan's floors is its own floor.
    target_epochs, min_epochs = min(target_epochs, recipe.epochs), min(min_epochs, recipe.epochs)
    for epochs in range(target_epochs, min_epochs - 1, -1):
        lo, hi = min(MIN_FRAMES_PER_EPOCH, recipe.frames_per_epoch), recipe.frames_per_epoch
        if _member_s(recipe, rates, epochs, lo, validation) > seconds:
            continue
        while hi - lo > recipe.batch_size:  # the most frames per epoch that fit
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _member_s(recipe, rates, epochs, mid, validation) <= seconds else (lo, mid)
        frames = -(-lo // recipe.batch_size) * recipe.batch_size
        if frames >= recipe.frames_per_epoch - recipe.batch_size and epochs == target_epochs:
            # Time to spare at the recipe's frames per epoch: more epochs, up to the recipe's.
            while epochs < recipe.epochs and (
                _member_s(recipe, rates, epochs + 1, recipe.frames_per_epoch, validation) <= seconds
            ):
                epochs += 1
            frames = recipe.frames_per_epoch
        return recipe.replace(
            epochs=epochs,
            frames_per_epoch=frames,
            pool_size=_pool(recipe, frames),
            validation_frames=validation,
        )
    return None


def _pool(recipe: Recipe, frames_per_epoch: int) -> int:
    # A pool larger than an epoch's frames is simulated but never seen whole.
    return min(recipe.pool_size, max(4096, frames_per_epoch))


def _member_s(recipe: Recipe, rates: StageRates, epochs: int, frames: int, validation: int) -> float:
    trial = recipe.replace(
        epochs=epochs, frames_per_epoch=frames, pool_size=_pool(recipe, frames), validation_frames=validation
    )
    return rates.member_seconds(trial)


def plan_two_stage(
    budget_s: float,
    instrument: Instrument,
    *,
    coarse: Recipe = DEFAULT_RECIPE,
    refiner: Recipe = REGISTERED_RECIPE,
    device: str = "cpu",
    rates: tuple[StageRates, StageRates] | None = None,
    sizes_given: bool = False,
) -> TwoStagePlan:
    """Members, epochs and frames per epoch of both stages that fit ``budget_s`` seconds.

    ``rates`` (coarse, refining): measured with :func:`measure_rates` when not given. Raises
    InputError when the budget cannot buy the smallest useful plan, unless ``sizes_given`` (the
    caller sets each member's epochs and frames itself: the budget buys nothing, a slow machine
    only takes longer).
    """
    spent = 0.0
    if rates is None:
        start = time.perf_counter()
        rates = (measure_rates(coarse, instrument, device), measure_rates(refiner, instrument, device))
        spent = time.perf_counter() - start
    coarse_rates, refiner_rates = rates
    members = 2 if budget_s >= TWO_MEMBERS_FROM_S else 1
    # Outside the members: the timing just done, and each stage's scoring of the stored ensemble
    # (its test frames) and the refining stage's quantisation correction (4,096 frames).
    overhead = spent + coarse_rates.frame_s * 2 * coarse.validation_frames + refiner_rates.frame_s * 4096
    planned_s = (budget_s - overhead) * SUSTAINED_SHARE
    # The smallest useful member of each stage; a short budget gives the refining stage at least
    # that, the coarse stage the rest (it is where the accuracy is made).
    coarse_min = _member_s(coarse, coarse_rates, MIN_COARSE_EPOCHS, MIN_FRAMES_PER_EPOCH, 1024)
    refiner_min = _member_s(refiner, refiner_rates, MIN_REFINER_EPOCHS, MIN_FRAMES_PER_EPOCH, 1024)
    refiner_s = max((1 - COARSE_SHARE) * planned_s / members, refiner_min)
    coarse_s = planned_s / members - refiner_s
    fitted_coarse = _fit_stage(coarse, coarse_rates, coarse_s, TARGET_COARSE_EPOCHS, MIN_COARSE_EPOCHS)
    fitted_refiner = _fit_stage(refiner, refiner_rates, refiner_s, TARGET_REFINER_EPOCHS, MIN_REFINER_EPOCHS)
    if sizes_given:
        fitted_coarse, fitted_refiner = fitted_coarse or coarse, fitted_refiner or refiner
    if fitted_coarse is None or fitted_refiner is None:
        smallest = math.ceil(coarse_min + refiner_min + overhead)
        raise InputError(
            f"a time budget of {budget_s:.0f} s is too short for a useful model: the smallest (1 coarse "
            f"member x {MIN_COARSE_EPOCHS} epochs and 1 refining member x {MIN_REFINER_EPOCHS} epochs, each "
            f"of {MIN_FRAMES_PER_EPOCH:,} frames, the fewest that train a coarse stage to register on, at "
            f"the measured {1 / coarse_rates.step_s:.3g} and {1 / refiner_rates.step_s:.3g} steps/s) needs "
            f"about {smallest} s here; give --time-budget {smallest}s or more"
        )
    return TwoStagePlan(
        fitted_coarse,
        members,
        fitted_refiner,
        members,
        coarse_rates,
        refiner_rates,
        budget_s,
        overhead,
        limits=(coarse, refiner),
    )


def train_two_stage(
    plan: TwoStagePlan,
    out: str | Path,
    instrument: Instrument,
    *,
    workdir: str | Path,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    command: str | None = None,
    say: Callable[[str], None] = print,
) -> tuple[str, dict[str, Any]]:
    """Train the plan's coarse ensemble into ``workdir/coarse.pt``, then its refining stage into
    ``out`` (one file, both stages). After each member the rest are re-planned (:func:`replan`) to
    fill the budget at the rate really sustained; ``workdir/plan.json`` keeps the plan as it
    stands. Re-running with the same ``workdir`` resumes: finished members and a finished coarse
    stage are reused, an interrupted member resumes from its last epoch's checkpoint."""
    from .ensemble import train_ensemble

    workdir = Path(workdir)
    coarse_file = workdir / "coarse.pt"
    _resume_note(workdir, plan, say)
    save_plan(workdir, plan, instrument, seed)
    # smoothing=0: the ETA from the mean rate since the start; the pool refreshes and validations
    # between epochs made the default moving average swing from minutes to hours.
    bar = tqdm(
        total=plan.total_steps, desc="training (both stages)", unit="step", disable=not progress, smoothing=0
    )
    current = plan

    def member_done(stage: str) -> Callable[[int, float], None]:
        def done(k: int, seconds: float) -> None:
            nonlocal current
            current, line = replan(current, stage, k, seconds)
            save_plan(workdir, current, instrument, seed)
            if line is not None:
                bar.total = current.total_steps
                bar.refresh()
                (bar.write if progress else say)(line)

        return done

    try:
        if coarse_file.exists():
            bar.update(sum(plan.member_steps("coarse", k) for k in range(plan.coarse_members)))
        else:
            partial = workdir / "coarse.partial.pt"
            train_ensemble(
                plan.coarse,
                plan.coarse_members,
                partial,
                instrument,
                seed=seed,
                workdir=workdir / "coarse",
                device=device,
                progress=progress,
                command=command,
                pbar=bar,
                recipe_for=lambda k: current.recipe_for("coarse", k),
                member_done=member_done("coarse"),
            )
            partial.replace(coarse_file)
        fitted = _refiner_for(plan.refiner, coarse_file)
        jitter = {
            "registration_jitter_deg": fitted.registration_jitter_deg,
            "registration_jitter_strain": fitted.registration_jitter_strain,
        }
        return train_ensemble(
            current.recipe_for("refiner", 0).replace(**jitter),
            plan.refiner_members,
            out,
            instrument,
            seed=seed,
            workdir=workdir / "refiner",
            device=device,
            progress=progress,
            command=command,
            base=coarse_file,
            pbar=bar,
            recipe_for=lambda k: current.recipe_for("refiner", k).replace(**jitter),
            member_done=member_done("refiner"),
        )
    finally:
        bar.close()


def _refiner_for(recipe: Recipe, coarse_file: Path) -> Recipe:
    """The refining recipe trained on the coarse stage's own error: its registration jitter is
    twice the coarse ensemble's test RMSE of (omega, chi), never below the recipe's, and of
    strain twice its RMSE, never below a third of the recipe's (a thick film's coarse strain is
    2x better than the seed's)."""
    from ..models import load_model_file

    _, meta = load_model_file(coarse_file)
    ensemble = meta["metrics"]["ensemble"]
    jitter = tuple(
        max(default, 2 * float(ensemble[f"rmse_{name}"]))
        for default, name in zip(recipe.registration_jitter_deg, ("omega", "chi"), strict=True)
    )
    strain = max(recipe.registration_jitter_strain / 3, 2 * float(ensemble["rmse_strain"]))
    return recipe.replace(registration_jitter_deg=jitter, registration_jitter_strain=strain)


def _steps(recipe: Recipe) -> int:
    return math.ceil(recipe.frames_per_epoch / recipe.batch_size)


def _plan_identity(plan: TwoStagePlan, instrument: Instrument, seed: int) -> str:
    return json.dumps(
        {
            "coarse": plan.coarse.to_dict(),
            "coarse_members": plan.coarse_members,
            "refiner": plan.refiner.to_dict(),
            "refiner_members": plan.refiner_members,
            "coarse_rates": dataclasses.asdict(plan.coarse_rates),
            "refiner_rates": dataclasses.asdict(plan.refiner_rates),
            "budget_s": plan.budget_s,
            "overhead_s": plan.overhead_s,
            "limits": None if plan.limits is None else [r.to_dict() for r in plan.limits],
            "replanned": [[stage, k, r.to_dict()] for stage, k, r in plan.replanned],
            "spent_s": plan.spent_s,
            "finished": plan.finished,
            "rate_scale": plan.rate_scale,
            "instrument": instrument.to_dict(),
            "seed": seed,
        },
        sort_keys=True,
        default=list,
    )


def _recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """A recipe read back from JSON (its tuples came back as lists)."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    values = {}
    for key, value in data.items():
        if key == "architecture_kwargs":
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        elif isinstance(value, list) and key in fields:
            value = tuple(value)
        values[key] = value
    return Recipe(**values)


def save_plan(workdir: str | Path, plan: TwoStagePlan, instrument: Instrument, seed: int) -> None:
    """Writes ``workdir/plan.json``, which a re-run of the same command trains on."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "plan.json").write_text(_plan_identity(plan, instrument, seed))


def load_plan(workdir: str | Path, budget_s: float, instrument: Instrument, seed: int) -> TwoStagePlan | None:
    """The plan an earlier run of the same command saved in ``workdir``, or None if there is none:
    a resumed run keeps its plan (a re-measured one would differ, and start afresh).

    Raises InputError when ``workdir`` holds a run for another budget, instrument or seed: its
    finished members and coarse stage would be reused for a plan they were not trained for.
    """
    path = Path(workdir) / "plan.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    differences = []
    same_instrument = json.dumps(instrument.to_dict(), sort_keys=True, default=list) == json.dumps(
        saved["instrument"], sort_keys=True, default=list
    )
    if not same_instrument:
        differences.append("another instrument")
    if saved["seed"] != seed:
        differences.append(f"seed {saved['seed']}, not {seed}")
    if not math.isclose(saved["budget_s"], budget_s):
        differences.append(f"a time budget of {saved['budget_s']:.0f} s, not {budget_s:.0f} s")
    if differences:
        raise InputError(
            f"{workdir} holds a training for {', '.join(differences)}: re-run that command to resume it, "
            "or give another --workdir (or remove this one) to start afresh"
        )
    return TwoStagePlan(
        _recipe_from_dict(saved["coarse"]),
        int(saved["coarse_members"]),
        _recipe_from_dict(saved["refiner"]),
        int(saved["refiner_members"]),
        StageRates(**saved["coarse_rates"]),
        StageRates(**saved["refiner_rates"]),
        float(saved["budget_s"]),
        float(saved.get("overhead_s", 0.0)),
        limits=None
        if saved.get("limits") is None
        else (_recipe_from_dict(saved["limits"][0]), _recipe_from_dict(saved["limits"][1])),
        replanned=tuple((stage, int(k), _recipe_from_dict(r)) for stage, k, r in saved.get("replanned", [])),
        spent_s=float(saved.get("spent_s", 0.0)),
        finished=int(saved.get("finished", 0)),
        rate_scale=saved.get("rate_scale"),
    )


def check_resume_overrides(
    plan: TwoStagePlan, overrides: dict[str, int], members: int | None, workdir: str | Path
) -> None:
    """Refuse explicit ``--epochs`` / ``--frames-per-epoch`` / ``--pool-size`` / ``--members`` that
    differ from the plan saved in ``workdir``: resuming keeps that plan, so they would be ignored."""
    flags = {"epochs": "--epochs", "frames_per_epoch": "--frames-per-epoch", "pool_size": "--pool-size"}
    differ = []
    for key, value in overrides.items():
        saved = {getattr(plan.coarse, key), getattr(plan.refiner, key)}
        if saved != {value}:
            differ.append(f"{flags[key]} {value} (saved: {' and '.join(str(v) for v in sorted(saved))})")
    if members is not None and {plan.coarse_members, plan.refiner_members} != {members}:
        differ.append(f"--members {members} (saved: {plan.coarse_members} and {plan.refiner_members})")
    if differ:
        raise InputError(
            f"{workdir} holds a plan this run would not change: {'; '.join(differ)}; re-run without these "
            "flags to resume it, or give another --workdir to train the new plan"
        )


def _resume_note(workdir: Path, plan: TwoStagePlan, say: Callable[[str], None]) -> None:
    """One line saying what a re-run finds in ``workdir`` and reuses."""
    if not workdir.exists():
        return
    done = sorted(workdir.glob("*/member-*/member.pt"))
    started = sorted(workdir.glob("*/member-*/checkpoint.pt"))
    if not done and not started:
        return
    parts = []
    if (workdir / "coarse.pt").exists():
        parts.append("the coarse stage is done")
    if done:
        parts.append(f"{len(done)} finished member(s) reused")
    interrupted = [c for c in started if not (c.parent / "member.pt").exists()]
    if interrupted:
        ckpt = torch.load(interrupted[0], map_location="cpu", weights_only=True)
        stage = interrupted[0].parent.parent.name
        epochs = plan.recipe_for(stage, int(interrupted[0].parent.name.split("-")[1])).epochs
        parts.append(
            f"{stage} {interrupted[0].parent.name} resumes at epoch {int(ckpt['epoch']) + 2} of {epochs}"
        )
    say(f"resuming from {workdir}: " + ", ".join(parts))
