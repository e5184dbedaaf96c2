"""Self-supervised adaptation of a model to an instrument, from a scan's unlabelled frames.

The DONUT idea (a network trained on unlabelled experimental frames through a physics model),
done with our exact forward model. For every scan frame the loss is its Poisson negative
log-likelihood under the forward model of the *data's* instrument, at the network's prediction
(strain, omega, chi and, for a model that predicts it, the film thickness), the count scale and
background at their best for the frame. Its gradient with respect to the prediction comes from the
same likelihood kernel as ``predict()``'s likelihood step (exact, not a finite difference), and
flows back through the network by the chain rule.

Supervised simulated batches of the data's instrument are mixed into every step (half the
frames), so the networks cannot drift where the scan's frames say little (parameters the scan does
not visit, count levels it does not have).

Both stages of a two-stage model are adapted: the first stage on all its outputs, the refining
networks on the tilts' residual from the (already adapted) first stage's whole-pixel shift.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import InputError
from ..inference import Predictor, inpaint
from ..models import ModelCard, NanobeamMLP, TiltRegistration, build_model, load_model_file, save_model_file
from ..physics import Instrument
from ..quality import PhysicsCheck
from .data import (
    Standardiser,
    instrument_mask,
    masked_like_predict,
    noisy_counts,
    random_parameters,
    thickness_box,
)
from .recipes import Recipe
from .trainer import RegisteredObjective, crlb_reference, crlb_thickness_reference

__all__ = ["ADAPTABLE_FIELDS", "AdaptationResult", "adapt_model", "adaptation_refusal", "refuse_overwrite"]

#: Instrument fields a model may be adapted across: the optics and film, known to a few per cent.
#: Energy, reflection, lattice, pixel size, ROI, binning and the parameter box change what the
#: frames are; a model for them is trained (``nanobeam train``), not adapted.
ADAPTABLE_FIELDS = (
    "film_thickness_angstrom",
    "zone_plate_diameter_m",
    "central_stop_diameter_m",
    "focal_length_m",
    "outermost_zone_width_m",
    "detector_distance_m",
    "beam_centre_offset_px",
)
#: The largest relative change of an adaptable length (detector distance, zone plate, stop).
MAX_RELATIVE_CHANGE = 0.15
#: Fewest usable frames to adapt on.
MIN_FRAMES = 64


@dataclass
class AdaptationResult:
    """What ``adapt_model`` did: the file written and the scan's mean deviance before and after."""

    out: Path
    sha256: str
    frames: int
    steps: int
    loss_before: float
    loss_after: float
    provenance: dict[str, Any]


def adaptation_refusal(model: Instrument, data: Instrument) -> str | None:
    """Why a model of instrument ``model`` cannot be adapted to ``data`` (None: it can)."""
    differences = model.differences(data)
    fixed = sorted(k for k in differences if k.split("[")[0] not in ADAPTABLE_FIELDS)
    if fixed:
        detail = ", ".join(f"{k}: model {differences[k][0]!r} vs data {differences[k][1]!r}" for k in fixed)
        return (
            f"the model is for another instrument ({detail}); adaptation corrects the optics and film "
            "(stop, zone plate, distance, thickness), not these: train a model for it with "
            "`nanobeam train --instrument <config>`"
        )
    for key in ("detector_distance_m", "zone_plate_diameter_m", "central_stop_diameter_m"):
        if key in differences:
            a, b = differences[key]
            if abs(b - a) > MAX_RELATIVE_CHANGE * abs(a):
                return (
                    f"{key} differs by {abs(b - a) / abs(a):.0%} (model {a!r}, data {b!r}), more than the "
                    f"{MAX_RELATIVE_CHANGE:.0%} adaptation can bridge: train a model with "
                    "`nanobeam train --instrument <config>`"
                )
    return None


def refuse_overwrite(model_path: str | Path, out: str | Path) -> None:
    """InputError when ``out`` is the model being adapted: adapt never overwrites its input."""
    if Path(out).resolve() == Path(model_path).resolve():
        raise InputError(f"adapt never overwrites its input model: choose another --out than {model_path}")


def _networks(states: list[dict[str, torch.Tensor]], card: ModelCard) -> tuple[list, list]:
    """Trainable first-stage members and refiners from a model file's states (``card``: its
    validated metadata)."""
    n_ref = card.refiner.n_members if card.refiner else 0
    coarse, fine = states[: len(states) - n_ref], states[len(states) - n_ref :]

    def build(arch: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(arch.name, **arch.kwargs)
        model.load_state_dict(state)
        return model.train()

    members = [build(card.architecture, s) for s in coarse]
    if not all(isinstance(m, NanobeamMLP) for m in members):
        raise InputError(
            f"adaptation needs the dense first stage ('mlp'); this model's is {card.architecture.name!r}"
        )
    assert card.refiner is not None or not fine
    refiners = [build(card.refiner.architecture, s) for s in fine] if card.refiner else []
    return members, refiners


def _frame_weights(recipe: Recipe, instrument: Instrument, outputs: int) -> torch.Tensor:
    """Normaliser of the likelihood term: its quadratic about the maximum, 1/2 (d/sigma)^2 per
    parameter, on the same scale as the supervised loss (which weights (d/half)^2 by
    (half/CRLB)^2 / mean)."""
    half = np.asarray(Standardiser.for_instrument(instrument).half_range)
    bound = crlb_reference(instrument, recipe.max_counts)
    if outputs == 4:
        half = np.r_[half, thickness_box(instrument, recipe.thickness_spread)[1]]
        bound = np.r_[bound, crlb_thickness_reference(instrument, recipe.max_counts)]
    return torch.tensor(float(((half / bound) ** 2).mean()))


def adapt_model(
    model_path: str | Path,
    frames: np.ndarray,
    out: str | Path,
    instrument: Instrument,
    *,
    scan: str = "",
    masked: np.ndarray | None = None,
    steps: int = 300,
    batch_size: int = 128,
    learning_rate: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
) -> AdaptationResult:
    """Fine-tune the model in ``model_path`` to ``instrument`` on unlabelled ``frames``.

    Args:
        model_path: the model to adapt (never overwritten: ``out`` must differ).
        frames: (N, F, F) binned counts in physics.md's frame (the scan's usable frames).
        out: the adapted model file to write; its instrument is ``instrument``.
        instrument: the data's instrument (what the scan's frames are).
        scan: where the frames came from (recorded in the provenance).
        masked: (F, F) or (N, F, F) pixels that are not observations (True), or None.
        steps: optimiser steps; each sees ``batch_size`` scan frames and as many simulated ones.
        learning_rate: Adam's (a tenth of training's: the networks start close).

    Returns what was done, with the scan's mean Poisson deviance per frame under the data's
    instrument at the model's prediction, before and after (the loss adaptation lowers).
    """
    model_path, out = Path(model_path), Path(out)
    refuse_overwrite(model_path, out)
    states, metadata = load_model_file(model_path)
    predictor = Predictor.from_states(states, metadata)
    refusal = adaptation_refusal(predictor.instrument, instrument)
    if refusal:
        raise InputError(refusal)
    recipe = Recipe(**metadata["recipe"])
    if len(frames) < MIN_FRAMES:
        raise InputError(
            f"{len(frames)} usable frames to adapt on; at least {MIN_FRAMES} are needed (scan more points)"
        )
    torch.manual_seed(seed)
    card = predictor.card
    members, refiners = _networks(states, card)
    physics = PhysicsCheck.for_instrument(instrument)
    n_out = len(card.outputs)
    centre = torch.tensor(card.output_centre, dtype=torch.float64)
    half = torch.tensor(card.output_half_range, dtype=torch.float64)
    nominal = instrument.film_thickness_angstrom
    counts_all = np.ascontiguousarray(frames, dtype=np.float32)
    mask_all = None if masked is None else np.broadcast_to(masked, counts_all.shape)
    net_input_all = counts_all if mask_all is None else inpaint(counts_all, mask_all)
    norm = _frame_weights(recipe, predictor.instrument, n_out)
    coarse_objective = _SupervisedObjective(recipe, instrument, card)
    # The refiners' whole-pixel shifts and output scale follow the data's instrument (the pixels
    # per degree change with the detector distance); their largest shift is the parent's.
    refiner_objective = None
    registration = None
    if refiners and predictor.card.refiner is not None:
        parent = predictor.card.refiner
        refiner_objective = RegisteredObjective(
            recipe.replace(refine_strain=parent.refines_strain), instrument
        )
        own = TiltRegistration.for_instrument(instrument, refine_strain=parent.refines_strain)
        registration = TiltRegistration(
            own.pixels_per_deg_omega,
            own.pixels_per_deg_chi,
            int(parent.registration["max_shift"]),
            own.pixels_per_strain,
            int(parent.registration.get("band_max_shift", 0)),
        )
        refiner_objective.registration = registration
    box = Standardiser.for_instrument(instrument)
    box_centre = torch.tensor(box.centre, dtype=torch.float32)
    box_half = torch.tensor(box.half_range, dtype=torch.float32)
    params = [p for m in [*members, *refiners] for p in m.parameters()]
    optimiser = torch.optim.Adam(params, lr=learning_rate)
    rng = np.random.default_rng([seed, 11])
    generator = torch.Generator().manual_seed(seed)

    def scan_loss(adapted: Predictor | None = None) -> float:
        """Mean deviance per frame of (up to 2,048 of) the scan's frames at the model's prediction."""
        chosen = np.random.default_rng(3).permutation(len(counts_all))[:2048]
        p = adapted or predictor
        estimate = p.predict_arrays(net_input_all[chosen])
        theta = np.c_[
            estimate.mean,
            estimate.thickness if estimate.thickness is not None else np.full(len(chosen), nominal),
        ]
        _, deviance = physics.log_likelihood_gradient(
            counts_all[chosen], theta, None if mask_all is None else mask_all[chosen]
        )
        return float(np.nanmean(deviance))

    loss_before = scan_loss()
    bar = tqdm(range(steps), desc="adapting", disable=not progress, unit="step")
    for _ in bar:
        pick = rng.integers(0, len(counts_all), batch_size)
        x = torch.as_tensor(net_input_all[pick])
        obs = counts_all[pick]
        obs_mask = None if mask_all is None else mask_all[pick]
        sim_x, sim_labels = _simulated_batch(instrument, recipe, card, batch_size, rng, generator)
        optimiser.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        coarse_means = []
        for member in members:
            raw = member(x[:, None]).double()  # (B, outputs), standardised
            theta = raw * half + centre
            coarse_means.append(theta.detach())
            full = torch.cat(
                [
                    theta[:, :3],
                    theta[:, 3:4] if n_out == 4 else torch.full((len(x), 1), nominal, dtype=torch.float64),
                ],
                1,
            )
            total = total + _likelihood_term(physics, obs, full, obs_mask, n_out, norm)
            out_sim, target = coarse_objective.outputs_and_targets(member, sim_x, sim_labels, generator)
            total = total + (((out_sim - target) ** 2) * coarse_objective.weights).mean()
        if refiner_objective is not None and registration is not None:
            coarse = torch.stack(coarse_means).mean(0)
            rows, cols, band_cols, base = registration.whole_pixel(coarse)
            for refiner in refiners:
                refined = refiner_objective.physical(refiner(x, rows, cols, band_cols), base)
                tilts = refined[:, :2]
                full = torch.cat(
                    [
                        refined[:, 2:3] if band_cols is not None else coarse[:, :1],
                        tilts,
                        coarse[:, 3:4]
                        if n_out == 4
                        else torch.full((len(x), 1), nominal, dtype=torch.float64),
                    ],
                    1,
                )
                total = total + _likelihood_term(
                    physics, obs, full, obs_mask, n_out, norm, tilts_only=band_cols is None, refined=True
                )
                sim_std = (sim_labels[:, :3] - box_centre) / box_half
                out_sim, target = refiner_objective.outputs_and_targets(refiner, sim_x, sim_std, generator)
                total = total + (((out_sim - target) ** 2) * refiner_objective.weights).mean()
        total.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{total.item():.3g}")
    bar.close()

    new_states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in [*members, *refiners]]
    new_meta = {
        k: v for k, v in metadata.items() if k not in ("sha256", "n_members", "weight_dtype", "int8_rows")
    }
    new_meta["instrument"] = instrument.to_dict()
    if card.predicts_thickness:  # trained on now: the model's spread about the data's film
        film, spread = thickness_box(instrument, recipe.thickness_spread)
        new_meta["thickness_range_angstrom"] = [film - spread, film + spread]
    if registration is not None:
        new_meta["refiner"] = {
            **metadata["refiner"],
            "registration": registration.to_dict(),
            "output_normalisation": {
                "centre": [0.0] * len(registration.output_scale),
                "half_range": list(registration.output_scale),
            },
        }
    new_meta["model_id"] = f"{metadata['model_id']}+adapted"
    adapted = Predictor.from_states(new_states, {**new_meta, "sha256": "unsaved"})
    loss_after = scan_loss(adapted)
    provenance = {
        "parent_sha256": metadata.get("sha256", ""),
        "parent_model_id": metadata.get("model_id", ""),
        "scan": scan,
        "scan_frames": len(counts_all),
        "scan_frames_sha256": hashlib.sha256(counts_all.tobytes()).hexdigest(),
        "loss": "mean Poisson deviance per frame at the model's prediction, data's instrument",
        "loss_before": loss_before,
        "loss_after": loss_after,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "parent_instrument": predictor.instrument.to_dict(),
        "command": command,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    new_meta["adaptation"] = [*metadata.get("adaptation", []), provenance]
    sha = save_model_file(out, new_states, new_meta, weight_dtype=torch.float16, int8_rows=True)
    return AdaptationResult(out, sha, len(counts_all), steps, loss_before, loss_after, provenance)


def _likelihood_term(
    physics: PhysicsCheck,
    counts: np.ndarray,
    theta: torch.Tensor,
    masked: np.ndarray | None,
    n_out: int,
    norm: torch.Tensor,
    *,
    tilts_only: bool = False,
    refined: bool = False,
) -> torch.Tensor:
    """A surrogate whose gradient in ``theta`` (B, 4) is the mean Poisson NLL's: -g . theta, with
    g = d log L / d theta from the likelihood kernel at theta (the scale and background at their
    best), scaled to the supervised loss's units."""
    gradient, _ = physics.log_likelihood_gradient(counts, theta.detach().numpy(), masked)
    g = torch.as_tensor(np.nan_to_num(gradient), dtype=torch.float64)
    if n_out == 3:
        g[:, 3] = 0.0  # the film is the instrument's: not the network's to move
    if tilts_only:
        g[:, [0, 3]] = 0.0  # the refiners output only the tilts
    elif refined:
        g[:, 3] = 0.0  # the refiners do not output the film
    return -2 * (g * theta).sum(1).mean() / norm


class _SupervisedObjective:
    """The first stage's training loss on simulated frames of the data's instrument, in the model's
    output standardisation (which adaptation keeps)."""

    def __init__(self, recipe: Recipe, instrument: Instrument, card: Any) -> None:
        from .trainer import Objective

        objective = Objective(recipe, instrument)
        self.centre = torch.tensor(card.output_centre, dtype=torch.float32)
        self.half = torch.tensor(card.output_half_range, dtype=torch.float32)
        self.weights = objective.weights[: len(card.output_centre)]
        self.n_out = len(card.output_centre)

    def outputs_and_targets(self, model, counts, labels, generator):
        target = (labels[:, : self.n_out] - self.centre) / self.half
        return model(counts[:, None]), target


def _simulated_batch(
    instrument: Instrument,
    recipe: Recipe,
    card: Any,
    n: int,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy simulated frames of ``instrument`` with the model's training departures, and their
    physical labels (strain, omega, chi[, thickness Å]) as float32 (B, 3 or 4)."""
    from ..physics import simulate_tensor

    params = random_parameters(instrument, n, rng)
    thickness = None
    if card.predicts_thickness:  # the model's spread about the data's film
        centre, half = thickness_box(instrument, recipe.thickness_spread)
        thickness = rng.uniform(centre - half, centre + half, n)
    strain, omega, chi = params.T
    frames = simulate_tensor(
        strain, omega, chi, instrument, upsample=recipe.upsample, thickness_angstrom=thickness
    )
    counts = noisy_counts(
        frames, recipe.max_counts, recipe.count_augmentation, generator, recipe.background_max
    )
    counts = masked_like_predict(counts, recipe.mask_fraction, generator, instrument_mask(instrument))
    labels = params if thickness is None else np.c_[params, thickness]
    return counts, torch.as_tensor(labels, dtype=torch.float32)
