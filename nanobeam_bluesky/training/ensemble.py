"""Training an ensemble and writing it as one self-describing model file."""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import InputError
from ..models import as_stored, load_model_file, save_model_file
from ..physics import UNITS, Instrument
from .data import thickness_box
from .recipes import Recipe
from .trainer import (
    PARAMETERS,
    RegisteredObjective,
    crlb_reference,
    crlb_thickness_reference,
    evaluate,
    objective_for,
    train_member,
)

if TYPE_CHECKING:
    import torch

__all__ = ["mean_registered_input", "model_metadata", "quantisation_bias_correction", "train_ensemble"]


def model_metadata(
    recipe: Recipe,
    instrument: Instrument,
    metrics: dict[str, Any],
    *,
    command: str | None = None,
) -> dict[str, Any]:
    """Everything a model file says about itself (the sha256 is added when saved)."""
    objective = objective_for(recipe, instrument)
    input_norm = (
        "sqrt(counts / per-frame mean)"
        if recipe.architecture == "mlp"
        else "raw counts (library-wide scale to max_counts)"
    )
    metadata: dict[str, Any] = {
        "model_id": f"nanobeam-{recipe.name}-{recipe.architecture}",
        "architecture": {
            "name": recipe.architecture,
            "kwargs": {**recipe.architecture_kwargs, **objective.model_kwargs},
        },
        "instrument": instrument.to_dict(),
        "parameters": list(PARAMETERS),
        "outputs": list(objective.names),
        "units": dict(UNITS),
        "parameter_ranges": {k: list(v) for k, v in instrument.parameter_ranges.items()},
        "output_normalisation": {
            "centre": objective.centre.tolist(),
            "half_range": objective.half_range.tolist(),
        },
        "input": {"frame_pixels": instrument.frame_pixels, "normalisation": input_norm},
        "count_level": {
            "max_counts": recipe.max_counts,
            "reference_intensity": 1.0,
            "augmentation": list(recipe.count_augmentation),
            "meaning": "expected counts = max_counts * frame, frame = simulate(...) (Laue max 1)",
        },
        "upsample": recipe.upsample or instrument.upsample,
        "recipe": recipe.to_dict(),
        "metrics": metrics,
        "crlb_rms": dict(
            zip(PARAMETERS, crlb_reference(instrument, recipe.max_counts).tolist(), strict=True)
        ),
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "training_command": command,
    }
    if "thickness" in objective.names:
        centre, half = thickness_box(instrument, recipe.thickness_spread)
        metadata["units"]["thickness"] = "Angstrom"
        metadata["thickness_range_angstrom"] = [centre - half, centre + half]
        metadata["crlb_rms"]["thickness"] = crlb_thickness_reference(instrument, recipe.max_counts)
    return metadata


def train_ensemble(
    recipe: Recipe,
    n_members: int,
    out: str | Path,
    instrument: Instrument = Instrument(),
    *,
    seed: int = 0,
    workdir: str | Path | None = None,
    device: str = "cpu",
    library: str | None = None,
    progress: bool = True,
    command: str | None = None,
    base: str | Path | None = None,
    pbar: Any = None,
    recipe_for: Callable[[int], Recipe] | None = None,
    member_done: Callable[[int, float], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Train ``n_members`` networks (seeds seed, seed+1, ...) and save them as one model file.

    Returns (the file's sha256: weights and metadata; metadata). With ``workdir``, each member
    keeps its metrics log and resumable checkpoint in ``workdir/member-<k>/``, and a finished member
    is not retrained.

    The ``registered`` recipe trains a refining stage for the coarse ensemble in the model file
    ``base`` (same instrument); the file written holds both stages. ``pbar``: one progress bar
    over all members (and whatever else shares it), advanced by each member's steps.

    ``recipe_for(k)``: member ``k``'s recipe when the members differ in size (a re-planned
    budget; asked just before the member trains), else ``recipe``; ``recipe`` describes the
    file. ``member_done(k, seconds)``: called after member ``k`` has trained in this call;
    ``seconds`` is its whole training time, a resumed member's epochs before the interruption
    included.
    """
    import torch

    from ..inference import InstrumentMismatchError, Predictor

    if n_members < 1:
        raise InputError(f"n_members must be >= 1, got {n_members}")
    refining = recipe.architecture == "registered_mlp"
    if refining and base is None:
        raise InputError(
            f"recipe {recipe.name!r} refines a coarse ensemble: pass its model file as base "
            "(`nanobeam train --recipe registered --base COARSE.pt`, COARSE.pt from "
            "`nanobeam train --recipe default`)"
        )
    if base is not None and not refining:
        raise InputError(f"base is only for the registered recipe, not {recipe.name!r}")
    if base is not None:
        base_states, base_meta = load_model_file(base)
        if "refiner" in base_meta:
            raise InputError(f"{base} already has a refining stage; pass the coarse model file")
        base_instrument = Instrument.from_dict(base_meta["instrument"])
        detail = base_instrument.describe_differences(instrument, "base", "recipe")
        if detail:
            raise InstrumentMismatchError(f"the base model {base} is for another instrument ({detail})")
    states, member_metrics = [], []
    for k in range(n_members):
        member_recipe = recipe if recipe_for is None else recipe_for(k)
        member_dir = Path(workdir) / f"member-{k}" if workdir else None
        done = member_dir / "member.pt" if member_dir else None
        if done is not None and done.exists():
            saved = torch.load(done, weights_only=True)
            states.append(saved["state_dict"])
            member_metrics.append(json.loads(saved["metrics"]))
            if pbar is not None:
                pbar.update(
                    member_recipe.epochs * -(-member_recipe.frames_per_epoch // member_recipe.batch_size)
                )
            continue
        started = time.perf_counter()
        result = train_member(
            member_recipe,
            instrument,
            seed=seed + k,
            workdir=member_dir,
            device=device,
            library=library,
            progress=progress,
            pbar=pbar,
        )
        # A resumed member: its epochs before the interruption count too (the re-plan reads
        # this as the member's rate).
        train_s = time.perf_counter() - started + result.resumed_s
        metrics = {
            **result.metrics,
            "epochs": member_recipe.epochs,
            "frames_per_epoch": member_recipe.frames_per_epoch,
            "train_s": round(train_s, 1),
        }
        states.append(result.state_dict)
        member_metrics.append(metrics)
        if done is not None:
            torch.save({"state_dict": result.state_dict, "metrics": json.dumps(metrics)}, done)
        if member_done is not None:
            member_done(k, train_s)

    # Stored compactly (float16, large matrices as int8 rows): score the weights as shipped.
    weight_dtype, int8_rows = torch.float16, True
    stored = as_stored(states, weight_dtype=weight_dtype, int8_rows=int8_rows)
    if refining:
        # The registered input is nearly the same frame every time, so the int8 rounding of the
        # input layer adds a near-constant shift: it biased chi by -0.2x the CRLB until corrected.
        mean_input = mean_registered_input(recipe, instrument, seed=seed)
        stored = as_stored(
            quantisation_bias_correction(states, stored, mean_input),
            weight_dtype=weight_dtype,
            int8_rows=int8_rows,
        )
        states = as_stored(base_states, weight_dtype=weight_dtype, int8_rows=int8_rows) + stored
        metadata = _refined_metadata(base_meta, recipe, instrument, n_members, member_metrics, command)
    else:
        states = stored
        metadata = model_metadata(recipe, instrument, {"members": member_metrics}, command=command)
    predictor = Predictor.from_states(states, {**metadata, "sha256": "unsaved"})
    from .data import make_data

    counts, truth = make_data(instrument, recipe, seed, library=library).test()
    # The networks alone: what ``*_err`` states without the physics check (``check=False``). (The
    # held-out frames' masks are filled, not declared, so the check would not apply to them.)
    ds = predictor.predict(counts.numpy(), check_instrument=False, check=False)
    # Scored on what the model reports: thickness too where it predicts one and the truth has it
    names = tuple(n for n in (*PARAMETERS, "thickness") if n in ds and not np.isnan(ds[n].values).all())
    names = names[: truth.shape[1]]
    pred = np.stack([ds[name].values for name in names], axis=1)
    ensemble: dict[str, Any] = {**evaluate(pred, truth[:, : len(names)], names)}
    ensemble["mean_std"] = {name: float(np.nanmean(ds[f"{name}_std"].values)) for name in names}
    if refining:
        metadata["metrics"]["coarse_ensemble"] = metadata["metrics"].get("ensemble")
    metadata["metrics"]["ensemble"] = ensemble
    # A quarter of float32, RMSE unchanged to < 0.2 % (measured on the shipped model). The stored
    # tensors are re-encoded from the already round-tripped ones: the encoding is idempotent.
    sha = save_model_file(out, states, metadata, weight_dtype=weight_dtype, int8_rows=int8_rows)
    return sha, {**metadata, "sha256": sha}


def _refined_metadata(
    base: dict[str, Any],
    recipe: Recipe,
    instrument: Instrument,
    n_members: int,
    member_metrics: list[dict[str, Any]],
    command: str | None,
) -> dict[str, Any]:
    """The coarse model's metadata plus a ``refiner`` section describing the second stage."""
    objective = RegisteredObjective(recipe, instrument)
    registration = objective.registration
    saved_keys = ("sha256", "n_members", "weight_dtype", "int8_rows")
    metadata = {k: v for k, v in base.items() if k not in saved_keys}
    metadata["model_id"] = f"{base['model_id']}+{recipe.name}"
    metadata["refiner"] = {
        "architecture": {
            "name": recipe.architecture,
            "kwargs": {**recipe.architecture_kwargs, **objective.model_kwargs},
        },
        "parameters": list(objective.names),
        "registration": registration.to_dict(),
        # Per output unit: degrees of (omega, chi) and, refining strain, pixels of the band.
        "output_normalisation": {
            "centre": [0.0] * len(registration.output_scale),
            "half_range": list(registration.output_scale),
        },
        "n_members": n_members,
        "recipe": recipe.to_dict(),
        "metrics": {"members": member_metrics},
        "base_sha256": base["sha256"],
        "training_command": command,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    return metadata


def quantisation_bias_correction(
    float_states: list[dict[str, Any]],
    stored_states: list[dict[str, Any]],
    mean_input: Any,
    layer: str = "layers.0",
) -> list[dict[str, Any]]:
    """Stored states whose first-layer bias absorbs the rounding of its weights at the mean input.

    ``b' = b + (W - W_stored) @ mean_input``: the stored layer's outputs then have the float
    layer's mean over the inputs ``mean_input`` was taken from (bias correction of data-free
    quantisation, Nagel et al. 2019).
    """
    import torch

    x = torch.as_tensor(mean_input, dtype=torch.float64)
    prefix = f"{layer}." if layer else ""
    out = []
    for full, stored in zip(float_states, stored_states, strict=True):
        w, w_stored = full[f"{prefix}weight"].double(), stored[f"{prefix}weight"].double()
        corrected = dict(stored)
        corrected[f"{prefix}bias"] = (stored[f"{prefix}bias"].double() + (w - w_stored) @ x).float()
        out.append(corrected)
    return out


def mean_registered_input(
    recipe: Recipe, instrument: Instrument, *, seed: int = 0, n: int = 4096
) -> torch.Tensor:
    """Mean input features of the refining network over its training distribution (float64)."""
    import torch

    from ..models import RegisteredMLP, build_model
    from ..physics import simulate_tensor
    from .data import noisy_counts, random_parameters

    objective = RegisteredObjective(recipe, instrument)
    rng = np.random.default_rng([seed, 7])
    params = random_parameters(instrument, n, rng)
    strain, omega, chi = params.T
    frames = simulate_tensor(strain, omega, chi, instrument, upsample=recipe.upsample)
    generator = torch.Generator().manual_seed(seed)
    counts = noisy_counts(frames, recipe.max_counts, recipe.count_augmentation, generator)
    noise = objective.draw_noise(n, generator)
    rows, cols, band_cols, _, _ = objective.shifts_and_targets(torch.as_tensor(params), noise)
    model = build_model(recipe.architecture, **{**recipe.architecture_kwargs, **objective.model_kwargs})
    if not isinstance(model, RegisteredMLP):
        raise InputError(
            f"recipe {recipe.name!r} is not a refining recipe (architecture "
            f"{recipe.architecture!r}, not 'registered_mlp')"
        )
    return model.features(counts, rows, cols, band_cols).double().mean(0)
