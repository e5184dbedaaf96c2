"""Prediction: an ensemble model file -> (strain, omega, chi) with uncertainty, per frame.

``Predictor.predict(frames)`` takes counts (N, 64, 64), or raw ROIs (N, 128, 128) that it bins
2 x 2, and returns an ``xarray.Dataset`` over ``frame`` with the ensemble mean and standard
deviation of each parameter, and a ``flag`` bit mask. A frame without usable signal gets NaN.
"""

from __future__ import annotations

import enum
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from .models import (
    NanobeamMLP,
    RegisteredMLP,
    TiltRegistration,
    build_model,
    load_model_file,
    normalise_counts,
)
from .physics import PARAMETERS, UNITS, Instrument, bin_roi, simulate

__all__ = [
    "PRETRAINED_FILE",
    "Flag",
    "InstrumentMismatchError",
    "Predictor",
    "load_pretrained",
]

PRETRAINED_FILE = "nanobeam-default.pt"


class Flag(enum.IntFlag):
    """Per-frame quality bits of the ``flag`` variable."""

    OK = 0
    #: Non-finite or negative values: no prediction.
    INVALID = 1
    #: Far too few counts for the model (below ``min_total_counts``): no prediction.
    LOW_COUNTS = 2
    #: The model raised on this frame's batch (set by the live callback): no prediction.
    MODEL_ERROR = 4
    #: The prediction lies outside the parameter box the model was trained on: extrapolated.
    OUT_OF_RANGE = 8


class InstrumentMismatchError(ValueError):
    """The data's instrument is not the one the model was trained for."""


class _StackedMLP(torch.nn.Module):
    """K dense members evaluated together: one GEMM for all first layers, then bmm.

    ``forward`` takes frames (NanobeamMLP members); ``stacked`` takes the members' common input
    features (N, D) (RegisteredMLP members, whose features depend on the shifts).
    """

    def __init__(self, members: list[NanobeamMLP] | list[RegisteredMLP]) -> None:
        super().__init__()
        linears = [[m for m in member.layers if isinstance(m, torch.nn.Linear)] for member in members]
        self.first_w = torch.nn.Parameter(torch.cat([ls[0].weight for ls in linears]), requires_grad=False)
        self.first_b = torch.nn.Parameter(torch.cat([ls[0].bias for ls in linears]), requires_grad=False)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.stack([ls[i].weight.T for ls in linears]), requires_grad=False)
            for i in range(1, len(linears[0]))
        )
        self.biases = torch.nn.ParameterList(
            torch.nn.Parameter(torch.stack([ls[i].bias[None] for ls in linears]), requires_grad=False)
            for i in range(1, len(linears[0]))
        )
        self.k = len(members)
        self.frame_pixels = members[0].frame_pixels

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, F, F) counts -> (K, N, 3) standardised outputs."""
        return self.stacked(normalise_counts(frames).flatten(1))

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) input features -> (K, N, outputs)."""
        h = torch.addmm(self.first_b, x, self.first_w.T)  # (N, K * h1)
        h = torch.relu(h).reshape(len(x), self.k, -1).transpose(0, 1)  # (K, N, h1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = torch.relu(h)
        return h


class Predictor:
    """An ensemble of trained networks with the metadata to use them correctly.

    With ``refiners`` (a model file with a ``refiner`` section), the tilts are predicted in two
    stages: the ensemble's mean tilts give each frame a whole-pixel shift that centres the
    annulus, and the refiners predict the sub-pixel rest from the shifted frame. Strain and its
    std come from the first ensemble, omega and chi and their std from the refiners.
    """

    def __init__(self, members: list[torch.nn.Module], metadata: dict[str, Any], *,
                 refiners: list[RegisteredMLP] | None = None,
                 device: str = "cpu", batch_size: int | None = None) -> None:
        self.metadata = metadata
        self.device = torch.device(device)
        # Frames per forward pass. On a CPU 1,024 frames (16 MB) stay in cache: 1.8x faster
        # than 8,192; a GPU wants large batches.
        self.batch_size = batch_size or (8192 if self.device.type == "cuda" else 1024)
        self.instrument = Instrument.from_dict(metadata["instrument"])
        norm = metadata["output_normalisation"]
        self._centre = torch.tensor(norm["centre"], dtype=torch.float64)
        self._half = torch.tensor(norm["half_range"], dtype=torch.float64)
        for m in members:
            m.eval().requires_grad_(False)
        if all(isinstance(m, NanobeamMLP) for m in members):
            self._net: torch.nn.Module | None = _StackedMLP(members).to(self.device)
            self._members = None
        else:
            self._net = None
            self._members = [m.to(self.device) for m in members]
        self._refiner: _StackedMLP | None = None
        if refiners:
            for m in refiners:
                m.eval().requires_grad_(False)
            ref = metadata["refiner"]
            self.registration = TiltRegistration(**ref["registration"])
            self._refiner_features = refiners[0].to(self.device).features
            self._refiner = _StackedMLP(refiners).to(self.device)
            self._refiner_half = torch.tensor(ref["output_normalisation"]["half_range"], dtype=torch.float64)
        counts = metadata["count_level"]
        low = min(1.0, counts.get("augmentation", [1.0, 1.0])[0])
        typical = metadata.get("typical_frame_sum") or float(
            simulate(0.0, 0.0, 0.0, self.instrument, upsample=2).sum()
        )
        #: Frames with fewer total counts are flagged LOW_COUNTS and not predicted.
        self.min_total_counts = 0.1 * low * counts["max_counts"] * typical
        # Expected error: the test RMSE at max_counts (frames uniform over the box), scaled to
        # each frame's counts as 1/sqrt(counts) -- the Cramer-Rao bound scales so, and is flat
        # over the box to +-4 %.
        metrics = metadata.get("metrics", {})
        self._test_rmse = {
            refined: np.array([(stage or {}).get(f"rmse_{p}", np.nan) for p in PARAMETERS])
            for refined, stage in ((True, metrics.get("ensemble")),
                                   (False, metrics.get("coarse_ensemble", metrics.get("ensemble"))))
        }
        rng = np.random.default_rng(0)
        box = [rng.uniform(lo, hi, 64) for lo, hi in self.instrument.parameter_ranges.values()]
        #: Mean expected total counts of a test frame (max_counts, uniform over the box).
        self.reference_total_counts = counts["max_counts"] * float(
            simulate(*box, self.instrument, upsample=2).sum(axis=(1, 2)).mean())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_states(cls, states: list[dict[str, torch.Tensor]], metadata: dict[str, Any],
                    **kwargs: Any) -> Predictor:
        def build(arch: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
            model = build_model(arch["name"], **arch.get("kwargs", {}))
            model.load_state_dict(state)
            return model

        n_refiners = metadata["refiner"]["n_members"] if "refiner" in metadata else 0
        coarse, fine = states[: len(states) - n_refiners], states[len(states) - n_refiners :]
        members = [build(metadata["architecture"], s) for s in coarse]
        refiners = [build(metadata["refiner"]["architecture"], s) for s in fine]
        return cls(members, metadata, refiners=refiners, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Predictor:
        """Load a model file (``torch.load(weights_only=True)``; sha256 verified)."""
        states, metadata = load_model_file(path)
        predictor = cls.from_states(states, metadata, **kwargs)
        predictor.path = Path(path)
        return predictor

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    @property
    def sha256(self) -> str:
        return self.metadata["sha256"]

    @property
    def n_members(self) -> int:
        return self._net.k if self._net is not None else len(self._members)

    @property
    def n_refiners(self) -> int:
        """Members of the refining stage (0: single-stage model)."""
        return self._refiner.k if self._refiner is not None else 0

    @property
    def frame_pixels(self) -> int:
        return int(self.metadata["input"]["frame_pixels"])

    def check_instrument(self, instrument: Instrument | None, *, allow_mismatch: bool = False) -> None:
        """Raise InstrumentMismatchError if ``instrument`` is not the model's (unless allowed)."""
        if instrument is None or allow_mismatch:
            return
        detail = self.instrument.describe_differences(instrument, "model", "data")
        if detail:
            raise InstrumentMismatchError(
                f"model {self.model_id} was trained for another instrument ({detail}). Train one "
                "for this instrument with `nanobeam train --instrument <config>`, or pass "
                "allow_instrument_mismatch=True if you know the difference does not matter."
            )

    # ------------------------------------------------------------------ prediction
    def as_frames(self, frames: Any) -> np.ndarray:
        """Validate and bring frames to (N, F, F) float32 counts (binning raw ROIs)."""
        arr = np.asarray(frames)
        f = self.frame_pixels
        raw = f * self.instrument.binning
        if arr.ndim == 4 and arr.shape[1] == 1:  # (N, 1, H, W) as area detectors deliver
            arr = arr[:, 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] not in ((f, f), (raw, raw)):
            raise ValueError(
                f"frames must be binned counts (N, {f}, {f}) or raw ROIs (N, {raw}, {raw}); got shape "
                f"{arr.shape}. Cut a {raw} x {raw} ROI around the reflection (nanobeam_bluesky.physics."
                "bin_roi) first."
            )
        if arr.shape[1] == raw:
            arr = bin_roi(arr, (raw // 2, raw // 2), roi=raw, binning=self.instrument.binning)
        return arr.astype(np.float32, copy=False)

    @torch.inference_mode()
    def predict_arrays(self, frames: np.ndarray, *, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(N, F, F) counts -> (mean (N, 3), std (N, 3)) in physical units, no checks or flags.

        ``refine=False`` skips the refining stage (the coarse ensemble alone).
        """
        means, stds = [], []
        for start in range(0, len(frames), self.batch_size):
            x = torch.as_tensor(frames[start : start + self.batch_size]).to(self.device)
            if self._net is not None:
                out = self._net(x)
            else:
                out = torch.stack([m(x[:, None]) for m in self._members])
            out = out.double().cpu() * self._half + self._centre  # (K, N, 3)
            mean = out.mean(0)
            std = out.std(0, correction=0) if out.shape[0] > 1 else torch.zeros_like(out[0])
            if self._refiner is not None and refine:
                tilts = self._refine(x, mean[:, 1], mean[:, 2])  # (K2, N, 2)
                mean[:, 1:] = tilts.mean(0)
                std[:, 1:] = tilts.std(0, correction=0) if tilts.shape[0] > 1 else 0.0
            means.append(mean)
            stds.append(std)
        if not means:
            return np.zeros((0, 3)), np.zeros((0, 3))
        return torch.cat(means).numpy(), torch.cat(stds).numpy()

    def _refine(self, frames: torch.Tensor, omega_deg: torch.Tensor, chi_deg: torch.Tensor) -> torch.Tensor:
        """Refined (omega, chi) in degrees per refiner, (K2, N, 2), from coarse tilts (N,)."""
        rows, cols = self.registration.shifts(omega_deg, chi_deg)
        features = self._refiner_features(frames, rows.to(self.device), cols.to(self.device))
        residual = self._refiner.stacked(features).double().cpu() * self._refiner_half
        return residual + torch.stack(self.registration.tilts(rows, cols), 1)

    def quality_flags(self, frames: np.ndarray) -> np.ndarray:
        """Flag bits per frame for unusable input (INVALID, LOW_COUNTS)."""
        flat = frames.reshape(len(frames), -1)
        totals = flat.sum(axis=1, dtype=np.float64)  # NaN or inf propagate into the total
        invalid = ~np.isfinite(totals) | (flat.min(axis=1, initial=0.0) < 0)
        flags = np.where(invalid, np.uint8(Flag.INVALID), np.uint8(0))
        flags[~invalid & (totals < self.min_total_counts)] |= np.uint8(Flag.LOW_COUNTS)
        return flags

    def predict(
        self,
        frames: Any,
        *,
        instrument: Instrument | None = None,
        allow_instrument_mismatch: bool = False,
        check_instrument: bool = True,
        refine: bool = True,
    ) -> xr.Dataset:
        """Predict (strain, omega, chi) and their ensemble spread for every frame.

        Args:
            frames: counts (N, 64, 64), or raw ROIs (N, 128, 128) binned here.
            instrument: the data's instrument; a different one than the model's is an error.
            allow_instrument_mismatch: use the model anyway.
            refine: use the refining stage when the model has one (False: the coarse ensemble's
                tilts, 2-3x less accurate, twice as fast).

        Returns a Dataset over ``frame``: strain (1), omega and chi (deg), their ``_std`` (the
        members' spread), their ``_err`` (the error to expect at this frame's counts: the model's
        test RMSE scaled by 1/sqrt(counts)), and ``flag`` (see :class:`Flag`); unusable frames
        get NaN.
        """
        if check_instrument:
            self.check_instrument(instrument, allow_mismatch=allow_instrument_mismatch)
        arr = self.as_frames(frames)
        flags = self.quality_flags(arr)
        usable = flags == 0
        mean = np.full((len(arr), 3), np.nan)
        std = np.full((len(arr), 3), np.nan)
        if usable.all():
            mean, std = self.predict_arrays(arr, refine=refine)
        elif usable.any():
            mean[usable], std[usable] = self.predict_arrays(np.ascontiguousarray(arr[usable]), refine=refine)
        flags |= self.range_flags(mean)
        refined = refine and self.n_refiners > 0
        err = self.expected_error(arr, refined=refined)
        err[np.isnan(mean)] = np.nan
        return self.to_dataset(mean, std, flags, refined=refined, err=err)

    def expected_error(self, frames: np.ndarray, *, refined: bool = True) -> np.ndarray:
        """(N, 3) RMSE to expect per frame (strain, deg, deg): test RMSE x sqrt(reference / counts).

        Calibrated on simulated frames of the model's instrument: it does not know about a real
        detector's or sample's departures from the simulation.
        """
        totals = frames.reshape(len(frames), -1).sum(axis=1, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.sqrt(self.reference_total_counts / totals)
        return scale[:, None] * self._test_rmse[refined][None, :]

    def range_flags(self, mean: np.ndarray) -> np.ndarray:
        """OUT_OF_RANGE where a prediction is more than 5 % of its range outside the box."""
        # By name: the metadata JSON is stored with sorted keys.
        ranges = np.array([self.metadata["parameter_ranges"][p] for p in PARAMETERS], dtype=float)
        margin = 0.05 * (ranges[:, 1] - ranges[:, 0])
        with np.errstate(invalid="ignore"):
            outside = ((mean < ranges[:, 0] - margin) | (mean > ranges[:, 1] + margin)).any(axis=1)
        return np.where(outside, Flag.OUT_OF_RANGE, 0).astype(np.uint8)

    def to_dataset(self, mean: np.ndarray, std: np.ndarray, flags: np.ndarray, *,
                   refined: bool = False, err: np.ndarray | None = None) -> xr.Dataset:
        err = np.full_like(mean, np.nan) if err is None else err
        data: dict[str, Any] = {}
        for i, name in enumerate(PARAMETERS):
            attrs = {"units": UNITS[name]}
            data[name] = ("frame", mean[:, i], attrs | {"long_name": f"{name} (ensemble mean)"})
            data[f"{name}_std"] = ("frame", std[:, i], attrs | {"long_name": f"{name} ensemble std"})
            data[f"{name}_err"] = ("frame", err[:, i], attrs | {
                "long_name": f"{name} expected error (test RMSE scaled to the frame's counts)"})
        data["flag"] = ("frame", flags.astype(np.uint8),
                        {"flag_masks": [int(f) for f in Flag if f],
                         "flag_meanings": " ".join(f.name.lower() for f in Flag if f)})
        return xr.Dataset(
            data,
            coords={"frame": np.arange(len(mean))},
            attrs={"model_id": self.model_id, "model_sha256": self.metadata.get("sha256", ""),
                   "n_members": self.n_members, "n_refiners": self.n_refiners if refined else 0},
        )


def load_pretrained(*, device: str = "cpu", **kwargs: Any) -> Predictor:
    """The shipped ensemble for the default instrument (physics.md), trained by ``nanobeam train``."""
    path = resources.files("nanobeam_bluesky") / "pretrained" / PRETRAINED_FILE
    with resources.as_file(path) as file:
        if not Path(file).exists():
            raise FileNotFoundError(
                f"the pretrained model {PRETRAINED_FILE} is missing from this installation; "
                "train it with the command in the README"
            )
        return Predictor.from_file(file, device=device, **kwargs)
