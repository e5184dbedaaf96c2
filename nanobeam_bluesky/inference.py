"""Prediction: an ensemble model file -> (strain, omega, chi) with honest errors and flags, per frame.

``Predictor.predict(frames)`` takes counts (N, 64, 64) in physics.md's frame, or raw ROIs
(N, 128, 128) in the detector's orientation that it orients and bins 2 x 2, and returns an
``xarray.Dataset`` over ``frame``. What happens to every frame:

1. plausibility (:func:`~nanobeam_bluesky.quality.prepare_frames`): masks, saturated, hot and
   non-integer pixels, invalid values, too few counts;
2. the network (two stages where the model has them) gives the estimate;
3. the physics check (:class:`~nanobeam_bluesky.quality.PhysicsCheck`): a Poisson-likelihood step
   from the network's estimate to the Cramer-Rao bound, ``*_err`` from the Fisher information of
   this frame, ``fit_quality``, the thickness and ring tests, and their flags.

A frame without a measurable ring gets NaN and a flag; any flag says "do not trust blindly".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr

from ._schema import variable_attrs
from .errors import NanobeamError
from .models import (
    Architecture,
    ModelCard,
    ModelFileError,
    NanobeamMLP,
    RegisteredMLP,
    TiltRegistration,
    build_model,
    load_model_file,
    normalise_counts,
)
from .physics import PARAMETERS, Instrument, simulate
from .quality import (
    FLAG_DTYPE,
    NO_VALUE,
    Flag,
    PhysicsCheck,
    PooledConsistency,
    prepare_frames,
)

__all__ = [
    "PRETRAINED_FILE",
    "Flag",
    "InstrumentMismatchError",
    "NetworkEstimate",
    "Prediction",
    "Predictor",
    "inpaint",
    "inpaint_tensor",
    "load_pretrained",
]

PRETRAINED_FILE = "nanobeam-default.pt"


class NetworkEstimate(NamedTuple):
    """The networks' output for N frames, in physical units (strain, deg, deg; Å)."""

    #: (N, 3) the ensemble mean.
    mean: np.ndarray
    #: (N, 3) the members' spread (not an error bar).
    std: np.ndarray
    #: (N,) the film thickness (Å) and its spread, for a model that predicts it; else None.
    thickness: np.ndarray | None = None
    thickness_std: np.ndarray | None = None


@dataclass
class Prediction:
    """What :meth:`Predictor.predict` finds, as arrays over N frames.

    Attributes:
        values: (N, 3) strain (1), omega and chi (deg); NaN where a flag says there is no value.
        std: (N, 3) the networks' spread.
        err: (N, 3) the error to expect (see ``nanobeam_bluesky._schema.ERR_MEANING``).
        flags: (N,) uint16 quality bits (:class:`~nanobeam_bluesky.quality.Flag`).
        checks: the physics check's per-frame outputs (fit_quality, thickness_z, count_scale,
            background); empty without the check.
        estimator: what made ``values``.
        refined: the networks' refining stage was used.
        pooled: the pooled tests' summary (the film thickness the frames say...); empty without
            the check.
        thickness, thickness_std, thickness_err: (N,) each frame's film thickness (Å), the
            networks' spread and the error to expect, for a model that predicts it; else None.
    """

    values: np.ndarray
    std: np.ndarray
    err: np.ndarray
    flags: np.ndarray
    checks: dict[str, np.ndarray]
    estimator: str
    refined: bool
    pooled: dict[str, Any] = field(default_factory=dict)
    thickness: np.ndarray | None = None
    thickness_std: np.ndarray | None = None
    thickness_err: np.ndarray | None = None


class InstrumentMismatchError(NanobeamError, ValueError):
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
    annulus, and the refiners predict the sub-pixel rest from the shifted frame. Omega and chi
    and their std come from the refiners; strain and its std from the refiners where they refine
    it too (a second copy of the frame centred on the band), else from the first ensemble.
    """

    def __init__(
        self,
        members: list[torch.nn.Module],
        metadata: dict[str, Any],
        *,
        refiners: list[RegisteredMLP] | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
    ) -> None:
        #: The model file's metadata, typed and validated (:class:`~nanobeam_bluesky.models.ModelCard`).
        self.card = ModelCard.from_metadata(metadata)
        self.metadata = metadata
        #: The model file it was loaded from (:meth:`from_file`), None for one made in memory.
        self.path: Path | None = None
        self.device = torch.device(device)
        # Frames per forward pass. On a CPU 1,024 frames (16 MB) stay in cache: 1.8x faster
        # than 8,192; a GPU wants large batches.
        self.batch_size = batch_size or (8192 if self.device.type == "cuda" else 1024)
        card = self.card
        self.instrument = card.instrument
        self._centre = torch.tensor(card.output_centre, dtype=torch.float64)
        self._half = torch.tensor(card.output_half_range, dtype=torch.float64)
        for m in members:
            m.eval().requires_grad_(False)
        # Dense members run stacked (_net); any other architecture one by one (_members).
        mlps = [m for m in members if isinstance(m, NanobeamMLP)]
        self._net: _StackedMLP | None = None
        self._members: list[torch.nn.Module] = []
        if len(mlps) == len(members):
            self._net = _StackedMLP(mlps).to(self.device)
        else:
            self._members = [m.to(self.device) for m in members]
        self._refiner: _StackedMLP | None = None
        if refiners and card.refiner is not None:
            for m in refiners:
                m.eval().requires_grad_(False)
            self.registration = TiltRegistration(**card.refiner.registration)
            self._refiner_features = refiners[0].to(self.device).features
            self._refiner = _StackedMLP(refiners).to(self.device)
            self._refiner_half = torch.tensor(card.refiner.half_range, dtype=torch.float64)
        # One simulation for both count references: the box centre, then 64 frames across it.
        rng = np.random.default_rng(0)
        strain, omega, chi = (
            np.r_[0.0, rng.uniform(lo, hi, 64)] for lo, hi in self.instrument.parameter_ranges.values()
        )
        sums = simulate(strain, omega, chi, self.instrument, upsample=2).sum(axis=(1, 2))
        typical = card.typical_frame_sum or float(sums[0])
        low = min(1.0, card.count_augmentation[0])
        #: Frames with fewer total counts are flagged LOW_COUNTS and not predicted.
        self.min_total_counts = 0.1 * low * card.max_counts * typical
        # Expected error of the networks alone: the test RMSE at max_counts (frames uniform over
        # the box), scaled to each frame's counts as 1/sqrt(counts).
        self._test_rmse = {True: np.array(card.test_rmse), False: np.array(card.coarse_test_rmse)}
        #: Mean expected total counts of a test frame (max_counts, uniform over the box).
        self.reference_total_counts = card.max_counts * float(sums[1:].mean())
        # The networks' error stops falling at the top of the count range they were trained on.
        self._least_error_scale = 1 / np.sqrt(max(1.0, card.count_augmentation[1]))
        ensemble = (metadata.get("metrics") or {}).get("ensemble") or {}
        #: Test RMSE of the networks' thickness (Å), NaN where not stored.
        self._test_rmse_thickness = float(ensemble.get("rmse_thickness", np.nan))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_states(
        cls, states: list[dict[str, torch.Tensor]], metadata: dict[str, Any], **kwargs: Any
    ) -> Predictor:
        def build(arch: Architecture, state: dict[str, torch.Tensor]) -> torch.nn.Module:
            model = build_model(arch.name, **arch.kwargs)
            model.load_state_dict(state)
            return model

        card = ModelCard.from_metadata(metadata)
        n_refiners = card.refiner.n_members if card.refiner else 0
        coarse, fine = states[: len(states) - n_refiners], states[len(states) - n_refiners :]
        members = [build(card.architecture, s) for s in coarse]
        refiners = []
        for s in fine:
            assert card.refiner is not None  # fine is empty without a refining stage
            refiner = build(card.refiner.architecture, s)
            if not isinstance(refiner, RegisteredMLP):  # the refining stage needs its features
                raise ModelFileError(
                    f"the refining stage's architecture is {card.refiner.architecture.name!r}; "
                    "only 'registered_mlp' can refine: re-train it with `nanobeam train --recipe registered`"
                )
            refiners.append(refiner)
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
        return self.card.model_id

    @property
    def sha256(self) -> str:
        return self.card.sha256

    @property
    def n_members(self) -> int:
        return self._net.k if self._net is not None else len(self._members)

    @property
    def n_refiners(self) -> int:
        """Members of the refining stage (0: single-stage model)."""
        return self._refiner.k if self._refiner is not None else 0

    @property
    def frame_pixels(self) -> int:
        return self.card.frame_pixels

    def check_instrument(self, instrument: Instrument | None, *, allow_mismatch: bool = False) -> None:
        """Raise InstrumentMismatchError if ``instrument`` is not the model's (unless allowed).

        The detector's orientation counts: a model made for a detector mounted one way refuses
        data described as mounted another way (:meth:`for_detector` re-targets it).
        """
        if instrument is None or allow_mismatch:
            return
        model = self.instrument
        if self.card.thickness_range_angstrom is not None:
            low, high = self.card.thickness_range_angstrom
            if low <= instrument.film_thickness_angstrom <= high:  # a film the model was trained on
                model = model.replace(film_thickness_angstrom=instrument.film_thickness_angstrom)
        detail = model.describe_differences(instrument, "model", "data", orientation=True)
        if detail:
            only_orientation = not model.differences(instrument)
            fix = (
                "The network works in physics.md's frame whatever the mounting: use "
                "`predictor.for_detector(instrument)` for this detector."
                if only_orientation
                else "Train one for this instrument with `nanobeam train --instrument <config>`, or pass "
                "allow_instrument_mismatch=True if you know the difference does not matter."
            )
            raise InstrumentMismatchError(
                f"model {self.model_id} was made for another instrument ({detail}). {fix}"
            )

    def for_detector(self, instrument: Instrument) -> Predictor:
        """The same networks for a detector mounted or masked differently (same physics).

        Orientation, mask, saturation and count type describe the detector, not the frames the
        networks see (always physics.md's frame); anything else differing is refused.
        """
        detail = self.instrument.describe_differences(instrument, "model", "detector")
        if detail:
            raise InstrumentMismatchError(
                f"for_detector changes only how the detector is mounted and masked; the physics "
                f"differs ({detail}). Train a model for it with `nanobeam train --instrument <config>`."
            )
        clone = object.__new__(Predictor)
        clone.__dict__.update(self.__dict__)
        clone.metadata = {**self.metadata, "instrument": instrument.to_dict()}
        clone.card = ModelCard.from_metadata(clone.metadata)
        clone.instrument = instrument
        return clone

    # ------------------------------------------------------------------ prediction
    def prepare(self, frames: Any, *, instrument: Instrument | None = None, mask: Any = None):
        """Plausibility, orientation, binning and masks (:func:`~nanobeam_bluesky.quality.prepare_frames`)."""
        inst = instrument or self.instrument
        return prepare_frames(
            frames,
            inst,
            mask=mask,
            min_total_counts=self.min_total_counts,
            min_frame_intensity=self.physics_check(inst).min_frame_intensity,
        )

    def as_frames(self, frames: Any) -> np.ndarray:
        """Validate and bring frames to (N, F, F) float32 counts in physics.md's frame (raw ROIs
        oriented with the model's detector and binned)."""
        return prepare_frames(frames, self.instrument).counts

    def physics_check(self, instrument: Instrument | None = None) -> PhysicsCheck:
        """The physics check for ``instrument`` (the model's by default), shared in the process."""
        return PhysicsCheck.for_instrument(instrument or self.instrument)

    @torch.inference_mode()
    def predict_arrays(self, frames: np.ndarray, *, refine: bool = True) -> NetworkEstimate:
        """(N, F, F) counts -> (mean (N, 3), std (N, 3)[, thickness (N,), its std]) in physical
        units, no checks or flags.

        ``refine=False`` skips the refining stage (the coarse ensemble alone).
        """
        n_out = len(self.card.outputs)
        means, stds = [], []
        for start in range(0, len(frames), self.batch_size):
            x = torch.as_tensor(frames[start : start + self.batch_size]).to(self.device)
            if self._net is not None:
                out = self._net(x)
            else:
                out = torch.stack([m(x[:, None]) for m in self._members])
            out = out.double().cpu() * self._half + self._centre  # (K, N, outputs)
            mean = out.mean(0)
            std = out.std(0, correction=0) if out.shape[0] > 1 else torch.zeros_like(out[0])
            if self._refiner is not None and refine:
                refined = self._refine(x, mean[:, :3])  # (K2, N, 3): strain NaN if not refined
                which = [0, 1, 2] if self.registration.refines_strain else [1, 2]
                mean[:, which] = refined[..., which].mean(0)
                std[:, which] = refined[..., which].std(0, correction=0) if len(refined) > 1 else 0.0
            means.append(mean)
            stds.append(std)
        mean_all = torch.cat(means).numpy() if means else np.zeros((0, n_out))
        std_all = torch.cat(stds).numpy() if stds else np.zeros((0, n_out))
        if n_out == 4:
            return NetworkEstimate(mean_all[:, :3], std_all[:, :3], mean_all[:, 3], std_all[:, 3])
        return NetworkEstimate(mean_all, std_all)

    def _refine(self, frames: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Refined (strain, omega deg, chi deg) per refiner, (K2, N, 3), from the coarse estimate
        (N, 3); strain is NaN where the refiners refine the tilts alone."""
        if self._refiner is None:  # predict_arrays calls this only for a two-stage model
            raise RuntimeError("this model has no refining stage")
        reg = self.registration
        rows, cols, band_cols, base = reg.whole_pixel(coarse)
        features = self._refiner_features(
            frames,
            rows.to(self.device),
            cols.to(self.device),
            None if band_cols is None else band_cols.to(self.device),
        )
        out = self._refiner.stacked(features).double().cpu() * self._refiner_half  # (K2, N, 2|3)
        refined = reg.physical(out + base)  # (omega, chi[, strain])
        nan = torch.full_like(refined[..., :1], float("nan"))
        strain = refined[..., 2:] if band_cols is not None else nan
        return torch.cat([strain, refined[..., :2]], -1)

    def predict(
        self,
        frames: Any,
        *,
        instrument: Instrument | None = None,
        mask: Any = None,
        allow_instrument_mismatch: bool = False,
        check_instrument: bool = True,
        refine: bool = True,
        check: bool = True,
        likelihood: bool = True,
        pooled: PooledConsistency | None = None,
        fit_film: bool = True,
    ) -> xr.Dataset:
        """Predict (strain, omega, chi) with honest errors and quality flags for every frame.

        Args:
            frames: counts (N, 64, 64) in physics.md's frame, or raw ROIs (N, 128, 128) in the
                detector's orientation (oriented with ``instrument``, or the model's, and binned).
            instrument: the data's instrument; a different one than the model's is an error. Its
                mask, saturation level and orientation are applied.
            mask: more pixels to leave out (True = masked), (64, 64) or (128, 128), or per frame.
            allow_instrument_mismatch: use the model anyway (the physics check then uses the
                data's instrument, so the likelihood step corrects what it can).
            refine: use the network's refining stage when the model has one.
            check: run the physics check (False: the network alone, no ``fit_quality``, ``*_err``
                from the model's test RMSE; about twice as fast).
            likelihood: report the likelihood step's estimate (False: the network's, checked).
            pooled: pool the physics check over more than this call (the live callback passes one
                per run); None pools this call's frames.
            fit_film: for a model that predicts the film thickness, fit it per frame in the
                likelihood step (``thickness_err`` from the Fisher information). False: the film is
                the instrument's (strain about 1.5x more precise when that is true; tested per
                frame by ``thickness_z`` and pooled, as for a model without the film output); the
                networks' thickness is still reported, with their test error.

        Returns a Dataset over ``frame``: ``strain`` (1), ``omega`` and ``chi`` (deg); their
        ``_err`` (the standard deviation to expect for this frame: from its Fisher information
        after the likelihood step, with a floor at the forward model's accuracy; or the network's
        test RMSE scaled to the frame's counts) and ``_std`` (the networks' spread, not an error);
        ``fit_quality`` (deviance z-score, about N(0, 1) when the physics describes the frame),
        ``thickness_z`` (the instrument's film tested), ``count_scale`` and ``background``
        (counts); ``thickness``, ``thickness_std``, ``thickness_err`` (Å) for a model that
        predicts the film; ``flag`` (see
        :class:`~nanobeam_bluesky.quality.Flag`). Frames without a measurable ring get NaN. The
        attributes hold the pooled tests' summary (e.g. the film thickness the frames say).
        """
        prediction = self.analyse(
            frames,
            instrument=instrument,
            mask=mask,
            allow_instrument_mismatch=allow_instrument_mismatch,
            check_instrument=check_instrument,
            refine=refine,
            check=check,
            likelihood=likelihood,
            pooled=pooled,
            fit_film=fit_film,
        )
        return self.to_dataset(prediction)

    def analyse(
        self,
        frames: Any,
        *,
        instrument: Instrument | None = None,
        mask: Any = None,
        allow_instrument_mismatch: bool = False,
        check_instrument: bool = True,
        refine: bool = True,
        check: bool = True,
        likelihood: bool = True,
        pooled: PooledConsistency | None = None,
        fit_film: bool = True,
    ) -> Prediction:
        """:meth:`predict`'s results as arrays (:class:`Prediction`), without the Dataset around them
        (what the live callback uses). Arguments as for :meth:`predict`."""
        if check_instrument:
            self.check_instrument(instrument, allow_mismatch=allow_instrument_mismatch)
        data_instrument = instrument or self.instrument
        prepared = self.prepare(frames, instrument=data_instrument, mask=mask)
        counts, masked, flags = prepared.counts, prepared.masked, prepared.flags
        n = len(counts)
        usable = (flags & FLAG_DTYPE(NO_VALUE)) == 0
        mean = np.full((n, 3), np.nan)
        std = np.full((n, 3), np.nan)
        err = np.full((n, 3), np.nan)
        # (thickness, its spread, its error) in Å for a model that predicts it
        film = np.full((3, n), np.nan) if self.card.predicts_thickness else None
        extra = {name: np.full(n, np.nan) for name in _CHECK_OUTPUTS}
        refined = refine and self.n_refiners > 0
        pool = PooledConsistency() if pooled is None else pooled
        if usable.any():
            rows = np.flatnonzero(usable) if not usable.all() else slice(None)
            sub = counts[rows]
            sub_masked = None if masked is None else masked[rows]
            nn_input = sub if sub_masked is None else inpaint(sub, sub_masked)
            estimate = self.predict_arrays(np.ascontiguousarray(nn_input), refine=refine)
            mean[rows], std[rows] = estimate.mean, estimate.std
            err[rows] = self.expected_error(sub, refined=refined)
            if film is not None and estimate.thickness is not None:
                film[0, rows], film[1, rows] = estimate.thickness, estimate.thickness_std
                film[2, rows] = err[rows][:, 0] / self._test_rmse[refined][0] * self._test_rmse_thickness
            if check:
                physics = self.physics_check(data_instrument)
                start_film = estimate.thickness if fit_film else None
                result = physics(sub, mean[rows], sub_masked, refine=likelihood, thickness=start_film)
                if likelihood:
                    mean[rows] = result.params
                    err[rows] = np.hypot(result.sigma, physics.error_floor)
                    if film is not None and start_film is not None:
                        film[0, rows], film[2, rows] = result.thickness, result.thickness_err
                measured = (result.flags & FLAG_DTYPE(NO_VALUE)) == 0
                pool.nominal_angstrom = data_instrument.film_thickness_angstrom
                pool.add(result, measured)
                if pool.mismatch:
                    result.flags[measured] |= FLAG_DTYPE(Flag.POOLED_MISMATCH)
                flags[rows] |= result.flags
                for name in _CHECK_OUTPUTS:
                    extra[name][rows] = getattr(result, _CHECK_OUTPUTS[name])
        no_value = (flags & FLAG_DTYPE(NO_VALUE)) != 0
        mean[no_value] = std[no_value] = err[no_value] = np.nan
        flags |= self.range_flags(mean)
        if film is not None:
            film[:, no_value] = np.nan
            flags |= self.thickness_range_flags(film[0])
            if check and pool.fitted_frames >= pool.min_frames:
                # The frames as a set say a film the networks never saw: a frame whose own fit
                # landed inside the range started from their clipped estimate, and film and strain
                # both move the band (68 A frames, a model of 76-158 A: 16 of 200 fits at 72-75 A,
                # strain errors 2x their stated error). All of the call's frames are out of range.
                pooled_film, _ = pool.thickness_estimate(data_instrument.film_thickness_angstrom)
                if self.thickness_range_flags(np.array([pooled_film]))[0]:
                    flags[~no_value] |= FLAG_DTYPE(Flag.OUT_OF_RANGE)
        return Prediction(
            values=mean,
            std=std,
            err=err,
            flags=flags,
            # with the film fitted there is no score test: no thickness_z
            checks={
                k: v
                for k, v in extra.items()
                if not (k == "thickness_z" and film is not None and likelihood and fit_film)
            }
            if check
            else {},
            estimator="likelihood step from the network" if check and likelihood else "network",
            refined=refined,
            pooled=pool.summary(data_instrument.film_thickness_angstrom) if check else {},
            thickness=None if film is None else film[0],
            thickness_std=None if film is None else film[1],
            thickness_err=None if film is None else film[2],
        )

    def expected_error(self, frames: np.ndarray, *, refined: bool = True) -> np.ndarray:
        """(N, 3) RMSE to expect of the network alone (strain, deg, deg): its test RMSE scaled
        by sqrt(reference / counts), never below its value at the top of the training count range.

        Calibrated on simulated frames of the model's instrument within that range (x0.5-x3 of
        7 counts for the shipped model: 0.91-1.00x the actual RMSE at 3.5-14 counts). Above it
        the networks stop improving (at 700 counts the shipped one's strain error is still its
        7-count error), which no count scaling can state; the physics check's ``*_err``, on by
        default, replaces it.
        """
        totals = frames.reshape(len(frames), -1).sum(axis=1, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.maximum(np.sqrt(self.reference_total_counts / totals), self._least_error_scale)
        return scale[:, None] * self._test_rmse[refined][None, :]

    def range_flags(self, mean: np.ndarray) -> np.ndarray:
        """OUT_OF_RANGE where a prediction is more than 5 % of its range outside the box."""
        # By name: the metadata JSON is stored with sorted keys.
        ranges = np.array([self.card.parameter_ranges[p] for p in PARAMETERS], dtype=float)
        margin = 0.05 * (ranges[:, 1] - ranges[:, 0])
        with np.errstate(invalid="ignore"):
            outside = ((mean < ranges[:, 0] - margin) | (mean > ranges[:, 1] + margin)).any(axis=1)
        return np.where(outside, Flag.OUT_OF_RANGE, 0).astype(FLAG_DTYPE)

    def thickness_range_flags(self, thickness: np.ndarray) -> np.ndarray:
        """OUT_OF_RANGE where a film (Å) is more than 5 % of the trained films' range outside it."""
        if self.card.thickness_range_angstrom is None:
            return np.zeros(len(thickness), dtype=FLAG_DTYPE)
        low, high = self.card.thickness_range_angstrom
        margin = 0.05 * (high - low)
        with np.errstate(invalid="ignore"):
            outside = (thickness < low - margin) | (thickness > high + margin)
        return np.where(outside, Flag.OUT_OF_RANGE, 0).astype(FLAG_DTYPE)

    def to_dataset(self, prediction: Prediction) -> xr.Dataset:
        """The Dataset :meth:`predict` returns, over ``frame``, from a :meth:`analyse` result."""
        p = prediction
        data: dict[str, Any] = {}
        for i, name in enumerate(PARAMETERS):
            for key, values in ((name, p.values), (f"{name}_std", p.std), (f"{name}_err", p.err)):
                data[key] = ("frame", values[:, i], variable_attrs(key, p.estimator))
        if p.thickness is not None:
            for key, film in (
                ("thickness", p.thickness),
                ("thickness_std", p.thickness_std),
                ("thickness_err", p.thickness_err),
            ):
                data[key] = ("frame", film, variable_attrs(key, p.estimator))
        for name, values in p.checks.items():
            data[name] = ("frame", values, variable_attrs(name))
        data["flag"] = ("frame", p.flags.astype(FLAG_DTYPE), variable_attrs("flag"))
        return xr.Dataset(
            data,
            coords={"frame": np.arange(len(p.values))},
            attrs={
                "model_id": self.model_id,
                "model_sha256": self.sha256,
                "n_members": self.n_members,
                "n_refiners": self.n_refiners if p.refined else 0,
                "estimator": p.estimator,
                **p.pooled,
                **({"model_lacks": ", ".join(self.card.lacks)} if self.card.lacks else {}),
            },
        )


#: The physics check's per-frame outputs in a result: {variable: Consistency attribute}.
_CHECK_OUTPUTS = {
    "fit_quality": "fit_quality",
    "thickness_z": "thickness_z",
    "count_scale": "scale",
    "background": "background",
}


def inpaint(counts: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Masked pixels filled with the mean of their unmasked neighbours (for the network's input).

    The networks were trained on complete frames; a module gap left at zero would read as a dark
    band. Two passes of a 3 x 3 mean fill gaps up to four pixels wide; what remains gets the frame's
    mean. The physics check never sees these values (it leaves masked pixels out).
    """
    if not masked.any():
        return counts
    filled = inpaint_tensor(torch.as_tensor(counts, dtype=torch.float32), torch.as_tensor(masked))
    return filled.numpy()


def inpaint_tensor(counts: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """:func:`inpaint` on tensors (N, F, F), on their device: what training applies to its
    randomly masked frames, so that the networks learn exactly what ``predict()`` shows them."""
    x = counts.float()[:, None]
    known = (~masked.bool()).float()[:, None]
    kernel = torch.ones(1, 1, 3, 3, device=x.device)
    filled = x * known
    for _ in range(2):
        total = torch.nn.functional.conv2d(filled, kernel, padding=1)
        weight = torch.nn.functional.conv2d(known, kernel, padding=1)
        fresh = (known == 0) & (weight > 0)
        filled = torch.where(fresh, total / weight.clamp(min=1e-12), filled)
        known = torch.where(fresh, torch.ones_like(known), known)
    mean = filled.sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp(min=1)
    return torch.where(known > 0, filled, mean)[:, 0]


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
