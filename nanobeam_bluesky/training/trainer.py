"""Training one ensemble member: epochs, validation, best checkpoint, early stopping, resume."""

from __future__ import annotations

import csv
import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import NanobeamError
from ..models import TiltRegistration, build_model
from ..physics import PARAMETERS, Instrument, crlb
from .data import GridData, OnTheFlyData, Standardiser, make_data, random_parameters, thickness_box
from .recipes import Recipe

__all__ = [
    "WITH_THICKNESS",
    "MemberResult",
    "Objective",
    "TrainingError",
    "crlb_reference",
    "crlb_thickness_reference",
    "evaluate",
    "loss_weights",
    "objective_for",
    "train_member",
]


class TrainingError(NanobeamError, RuntimeError):
    """Training that produced no usable network (no epoch with a finite validation loss)."""


@dataclass
class MemberResult:
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    #: Seconds of training (epochs) done before this call, restored from a checkpoint: what a
    #: resumed member took before its interruption.
    resumed_s: float = 0.0


@functools.lru_cache(maxsize=16)
def crlb_reference(instrument: Instrument, max_counts: float, n: int = 64) -> np.ndarray:
    """RMS Cramer-Rao bound over the parameter box (strain, omega deg, chi deg)."""
    params = random_parameters(instrument, n, np.random.default_rng(7))
    strains, omegas, chis = params.T
    bound = crlb(strains, omegas, chis, instrument, max_counts=max_counts)
    return np.sqrt((bound**2).mean(axis=0))


#: The outputs of a network that predicts the film thickness too (Å), in their order.
WITH_THICKNESS = (*PARAMETERS, "thickness")


@functools.lru_cache(maxsize=16)
def crlb_thickness_reference(instrument: Instrument, max_counts: float, n: int = 64) -> float:
    """RMS Cramer-Rao bound of the film thickness (Å) over the box, all four unknown."""
    params = random_parameters(instrument, n, np.random.default_rng(7))
    strains, omegas, chis = params.T
    bound = crlb(strains, omegas, chis, instrument, max_counts=max_counts, with_thickness=True)
    return float(np.sqrt((bound[:, 3] ** 2).mean()))


def loss_weights(recipe: Recipe, instrument: Instrument) -> torch.Tensor:
    if recipe.loss_weights == "equal":
        return torch.ones(3)
    half = np.asarray(Standardiser.for_instrument(instrument).half_range)
    w = (half / crlb_reference(instrument, recipe.max_counts)) ** 2
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def evaluate(pred: np.ndarray, truth: np.ndarray, names: tuple[str, ...] = PARAMETERS) -> dict[str, float]:
    """RMSE and bias per parameter, physical units (strain, degrees)."""
    err = pred - truth
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"rmse_{name}"] = float(np.sqrt(np.mean(err[:, i] ** 2)))
        out[f"bias_{name}"] = float(np.mean(err[:, i]))
    return out


class Objective:
    """What a network is fed and scored on: here all three parameters straight from the frame,
    and the film thickness (Å) as a fourth when the recipe varies it (``thickness_spread``).

    Outputs are standardised by ``half_range`` (physical units per output unit) around ``centre``;
    the loss is the ``weights``-weighted mean square of the standardised error. The truth arrays
    are (N, 3), or (N, 4) with the thickness.
    """

    def __init__(self, recipe: Recipe, instrument: Instrument) -> None:
        std = Standardiser.for_instrument(instrument)
        self.names: tuple[str, ...] = PARAMETERS
        self.centre = np.asarray(std.centre)
        self.half_range = np.asarray(std.half_range)
        self.weights = loss_weights(recipe, instrument)
        self.model_kwargs: dict[str, Any] = {}
        if recipe.thickness_spread > 0 and recipe.architecture == "mlp":
            centre, half = thickness_box(instrument, recipe.thickness_spread)
            self.names = WITH_THICKNESS
            self.centre = np.r_[self.centre, centre]
            self.half_range = np.r_[self.half_range, half]
            # Weighted like the others: each learnt to the same fraction of its Cramer-Rao bound.
            self.weights = torch.ones(4)
            if recipe.loss_weights == "crlb":
                bound = np.r_[
                    crlb_reference(instrument, recipe.max_counts),
                    crlb_thickness_reference(instrument, recipe.max_counts),
                ]
                w = (self.half_range / bound) ** 2
                self.weights = torch.as_tensor(w / w.mean(), dtype=torch.float32)
            self.model_kwargs = {"n_outputs": 4}
        self.index = [WITH_THICKNESS.index(n) for n in self.names]

    def outputs_and_targets(
        self, model: torch.nn.Module, counts: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs and standardised targets for one batch (labels: the box-standardised truth)."""
        return model(counts[:, None]), labels

    @torch.inference_mode()
    def predict(
        self, model: torch.nn.Module, counts: torch.Tensor, truth: np.ndarray, device: str, batch: int = 2048
    ) -> np.ndarray:
        """Physical predictions (N, len(names)); ``truth`` is for objectives that need a start."""
        model.eval()
        out = [model(counts[i : i + batch].to(device)[:, None]).cpu() for i in range(0, len(counts), batch)]
        model.train()
        return torch.cat(out).double().numpy() * self.half_range + self.centre

    def loss(self, pred: np.ndarray, truth: np.ndarray) -> float:
        """The training loss of physical predictions against the full truth (N, 3)."""
        err = (pred - truth[:, self.index]) / self.half_range
        return float((err**2 * self.weights.cpu().numpy()).mean())


class RegisteredObjective(Objective):
    """The refining stage: the tilts' (and with ``recipe.refine_strain`` the strain's) residual
    on frames shifted to a coarse estimate.

    In training the coarse estimate is the truth plus Gaussian noise of
    ``recipe.registration_jitter_deg`` (and ``registration_jitter_strain``), about twice the
    coarse ensemble's RMSE, so the network learns every residual the shift may leave; validation
    and test use fixed such draws. Outputs are (omega, chi[, strain]); the network's third output
    is the band's residual in pixels, turned into strain with the refined omega.
    """

    def __init__(self, recipe: Recipe, instrument: Instrument) -> None:
        super().__init__(recipe, instrument)
        self.registration = TiltRegistration.for_instrument(instrument, refine_strain=recipe.refine_strain)
        self.names = ("omega", "chi", "strain") if recipe.refine_strain else ("omega", "chi")
        self.index = [PARAMETERS.index(n) for n in self.names]
        self.centre = np.zeros(len(self.names))
        # Physical units per output unit: one pixel of annulus (or band) shift.
        self.half_range = np.asarray(self.registration.residual_half_range_deg)
        if recipe.refine_strain:
            self.half_range = np.r_[self.half_range, 1 / self.registration.pixels_per_strain]
        box = Standardiser.for_instrument(instrument)
        self._box_centre = torch.as_tensor(box.centre)
        self._box_half = torch.as_tensor(box.half_range)
        w = (self.half_range / crlb_reference(instrument, recipe.max_counts)[self.index]) ** 2
        self.weights = torch.as_tensor(w / w.mean(), dtype=torch.float32)
        jitter = (recipe.registration_jitter_strain, *recipe.registration_jitter_deg)
        self.jitter = torch.as_tensor(jitter, dtype=torch.float64)
        self.model_kwargs = {"max_shift": self.registration.max_shift}
        if recipe.refine_strain:
            self.model_kwargs["band_max_shift"] = self.registration.band_max_shift

    def shifts_and_targets(self, params: torch.Tensor, noise: torch.Tensor):
        """Shifts for true (strain, omega deg, chi deg) (N, 3) plus ``noise`` (N, 3) x jitter.

        Returns (rows, cols, band_cols or None, base, standardised targets): ``base`` is what
        the whole-pixel shifts alone say, (omega, chi[, band pixels]).
        """
        reg = self.registration
        rows, cols, band_cols, base = reg.whole_pixel(params + noise * self.jitter.to(params.device))
        truth = params[:, 1:3]
        if reg.refines_strain:
            truth = torch.cat([truth, reg.band_position(params[:, 0], params[:, 1])[:, None]], 1)
        scale = torch.as_tensor(reg.output_scale, device=params.device, dtype=torch.float64)
        return rows, cols, band_cols, base, ((truth - base) / scale).float()

    def draw_noise(self, n: int, generator: torch.Generator, device: Any = "cpu") -> torch.Tensor:
        """Standard normal (N, 3) for (strain, omega, chi); the strain column only when refined
        (so a tilts-only refiner draws the stream it always drew)."""
        refines = self.registration.refines_strain
        noise = torch.randn((n, 3 if refines else 2), generator=generator, device=device, dtype=torch.float64)
        return noise if refines else torch.cat([torch.zeros_like(noise[:, :1]), noise], 1)

    def physical(self, out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Network outputs (N, 2 or 3) -> (omega, chi[, strain]) in degrees and strain (float64)."""
        reg = self.registration
        return reg.physical(out.double() * torch.as_tensor(reg.output_scale, dtype=torch.float64) + base)

    def outputs_and_targets(self, model, counts, labels, generator):
        box_half = self._box_half.to(labels.device)
        params = labels[:, :3].double() * box_half + self._box_centre.to(labels.device)
        noise = self.draw_noise(len(params), generator, params.device)
        rows, cols, band_cols, _, target = self.shifts_and_targets(params, noise)
        return model(counts, rows, cols, band_cols), target

    @torch.inference_mode()
    def predict(self, model, counts, truth, device, batch=2048):
        model.eval()
        params = torch.as_tensor(truth[:, :3], dtype=torch.float64)
        noise = self.draw_noise(len(params), torch.Generator().manual_seed(99))
        rows, cols, band_cols, base, _ = self.shifts_and_targets(params, noise)
        out = []
        for i in range(0, len(counts), batch):
            part = slice(i, i + batch)
            band = None if band_cols is None else band_cols[part].to(device)
            out.append(
                model(counts[part].to(device), rows[part].to(device), cols[part].to(device), band).cpu()
            )
        model.train()
        return self.physical(torch.cat(out), base).numpy()


def objective_for(recipe: Recipe, instrument: Instrument) -> Objective:
    return (
        RegisteredObjective(recipe, instrument)
        if recipe.architecture == "registered_mlp"
        else Objective(recipe, instrument)
    )


def _learning_rate(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    total = recipe.epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch
    if step < warmup:
        return recipe.learning_rate * (step + 1) / warmup
    if recipe.lr_schedule == "constant":
        return recipe.learning_rate
    t = (step - warmup) / max(1, total - warmup)
    return recipe.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass
class _Progress:
    """Where training stands after an epoch: what a checkpoint saves and a resume restores."""

    epoch: int = -1
    best_val: float = math.inf
    since_best: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self, epoch: int, row: dict[str, float], model: torch.nn.Module) -> None:
        """Adds an epoch's metrics; keeps the weights when its validation loss is the best."""
        self.epoch = epoch
        self.history.append(row)
        if row["val_loss"] < self.best_val:
            self.best_val, self.since_best = row["val_loss"], 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.since_best += 1

    def save(
        self, path: Path, identity: str, model: torch.nn.Module, optimiser: torch.optim.Optimizer
    ) -> None:
        torch.save(
            {
                "identity": identity,
                "epoch": self.epoch,
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "best_val": self.best_val,
                "since_best": self.since_best,
                "best_model": self.best_state,
                "history": json.dumps(self.history),
            },
            path,
        )

    @classmethod
    def resume(
        cls, path: Path, identity: str, model: torch.nn.Module, optimiser: torch.optim.Optimizer, device: str
    ) -> _Progress:
        """The progress saved at ``path`` (model and optimiser restored) if it is this training's."""
        if not path.exists():
            return cls()
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if ckpt["identity"] != identity:  # another recipe, seed or instrument: start afresh
            return cls()
        model.load_state_dict(ckpt["model"])
        optimiser.load_state_dict(ckpt["optimiser"])
        return cls(
            ckpt["epoch"],
            ckpt["best_val"],
            ckpt["since_best"],
            ckpt["best_model"],
            json.loads(ckpt["history"]),
        )


def _train_epoch(
    recipe: Recipe,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    objective: Objective,
    weights: torch.Tensor,
    data: GridData | OnTheFlyData,
    epoch: int,
    seed: int,
    device: str,
    pbar: Any,
) -> tuple[float, float]:
    """One pass over the epoch's training frames; returns (mean training loss, last learning rate)."""
    steps_per_epoch = data.steps_per_epoch()
    data.prepare(epoch)
    # Index order on the CPU, noise on the training device; both fixed by (seed, epoch).
    generators = (
        torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch + 1),
    )
    running, n_batches, lr = 0.0, 0, recipe.learning_rate
    for i, (x, y) in enumerate(data.batches(epoch, generators, device)):
        lr = _learning_rate(recipe, epoch * steps_per_epoch + i, steps_per_epoch)
        for group in optimiser.param_groups:
            group["lr"] = lr
        out, target = objective.outputs_and_targets(model, x, y, generators[1])
        loss = (((out - target) ** 2) * weights).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running += loss.item()
        n_batches += 1
        pbar.update(1)
    return running / max(1, n_batches), lr


def train_member(
    recipe: Recipe,
    instrument: Instrument = Instrument(),
    *,
    seed: int = 0,
    workdir: str | Path | None = None,
    device: str = "cpu",
    library: str | None = None,
    progress: bool = True,
    resume: bool = True,
    pbar: Any = None,
) -> MemberResult:
    """Train one network; returns the best-validation weights and its metrics.

    With ``workdir``, writes ``metrics.csv`` (one row per epoch) and ``checkpoint.pt`` after every
    epoch, and resumes from that checkpoint when it matches this recipe and seed.

    ``pbar``: a progress bar shared with other members (one ETA over a whole plan); it advances by
    this member's ``epochs`` x steps per epoch in all, resumed, trained or stopped early.
    """
    torch.manual_seed(seed)
    bar = tqdm if progress else None
    data = make_data(instrument, recipe, seed, library=library, progress=bar, device=device)
    objective = objective_for(recipe, instrument)
    kwargs = {**recipe.architecture_kwargs, **objective.model_kwargs}
    model = build_model(recipe.architecture, **kwargs).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    weights = objective.weights.to(device)
    val_counts, val_params = data.validation()
    identity = json.dumps(
        {"recipe": recipe.to_dict(), "seed": seed, "instrument": instrument.to_dict()},
        sort_keys=True,
        default=list,
    )

    workdir = Path(workdir) if workdir is not None else None
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    state = _Progress()
    if resume and workdir:
        state = _Progress.resume(workdir / "checkpoint.pt", identity, model, optimiser, device)

    steps_per_epoch = data.steps_per_epoch()
    shared = pbar is not None
    if pbar is None:
        pbar = tqdm(
            total=recipe.epochs * steps_per_epoch,
            initial=(state.epoch + 1) * steps_per_epoch,
            desc=f"{recipe.name} seed {seed}",
            disable=not progress,
            unit="step",
        )
    else:
        pbar.set_description(f"{recipe.name} seed {seed}")
        pbar.update((state.epoch + 1) * steps_per_epoch)
    # elapsed_s counts on from the checkpoint's: a resumed member's log shows its whole training
    # time, less the interruption (and the epoch it cut short).
    resumed_s = float(state.history[-1]["elapsed_s"]) if state.history else 0.0
    start_time = time.perf_counter() - resumed_s
    stopped_early = False
    for epoch in range(state.epoch + 1, recipe.epochs):
        train_loss, lr = _train_epoch(
            recipe, model, optimiser, objective, weights, data, epoch, seed, device, pbar
        )
        pred = objective.predict(model, val_counts, val_params, device)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": objective.loss(pred, val_params),
            "lr": lr,
            "elapsed_s": time.perf_counter() - start_time,
        }
        scores = evaluate(pred, val_params[:, objective.index], objective.names)
        row |= {f"val_{k}": v for k, v in scores.items() if k.startswith("rmse")}
        state.record(epoch, row, model)
        pbar.set_postfix(val_loss=f"{row['val_loss']:.3g}", best=f"{state.best_val:.3g}")
        if workdir:
            _write_history(workdir / "metrics.csv", state.history)
            state.save(workdir / "checkpoint.pt", identity, model, optimiser)
        if _should_stop(recipe, epoch, state.since_best):
            stopped_early = True
            break
    if shared:  # the steps an early stop skipped: the shared bar's total counts them
        pbar.update((recipe.epochs - 1 - max(state.epoch, -1)) * steps_per_epoch)
    else:
        pbar.close()
    result = _best_member(recipe, seed, state, model, objective, data, device, stopped_early)
    return replace(result, resumed_s=resumed_s)


def _best_member(
    recipe: Recipe,
    seed: int,
    state: _Progress,
    model: torch.nn.Module,
    objective: Objective,
    data: GridData | OnTheFlyData,
    device: str,
    stopped_early: bool,
) -> MemberResult:
    """The best-validation weights, scored on the test frames."""
    if state.best_state is None:  # no epoch to run, or every validation loss NaN (diverged)
        why = (
            f"recipe has epochs={recipe.epochs}"
            if not state.history
            else f"none of its {len(state.history)} epochs gave a finite validation loss (diverged: lower "
            "the learning rate)"
        )
        raise TrainingError(f"{recipe.name} seed {seed}: no network to keep: {why}")
    model.load_state_dict(state.best_state)
    test_counts, test_params = data.test()
    test_pred = objective.predict(model, test_counts, test_params, device)
    metrics = {
        f"test_{k}": v
        for k, v in evaluate(test_pred, test_params[:, objective.index], objective.names).items()
    }
    metrics |= {
        "best_val_loss": state.best_val,
        "epochs_trained": len(state.history),
        "stopped_early": stopped_early,
        "test_frames": len(test_params),
    }
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    return MemberResult(state_dict=weights, metrics=metrics, history=state.history)


def _should_stop(recipe: Recipe, epoch: int, since_best: int) -> bool:
    """Early stopping: ``patience`` epochs without improvement, all of them after arming."""
    patience = recipe.early_stopping_patience
    if patience is None:
        return False
    armed_at = math.ceil(recipe.early_stopping_from * recipe.epochs)  # first armed epoch, 0-based
    return since_best >= patience and epoch + 1 - armed_at >= patience


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
