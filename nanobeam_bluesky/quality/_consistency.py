"""Physics consistency of an estimate, and the Poisson-likelihood step that takes it to the bound.

For every frame and estimate (strain, omega, chi) -- the network's, or a fit's -- the forward model
gives the expected counts mu = s I(strain, omega, chi) + b on every binned pixel (physics.md's
nuisances: s the count scale, fitted; b a flat background, estimated from the pixels the annulus
cannot light). From there:

* **Likelihood step** (``refine=True``): Fisher-scoring (Gauss-Newton for Poisson counts) steps
  in (strain, omega, chi, s) from the estimate. The network's estimate is within about its own
  error of the maximum, so one step reaches the maximum-likelihood estimate to a small fraction
  of the noise; frames whose step was larger than ``converged_sigma`` standard deviations take
  another, up to ``max_steps``. Masked pixels are left out.
* **Errors**: the inverse Fisher information at the estimate (with s and b fitted) gives each
  parameter's standard deviation for this frame's counts, mask and position in the box.
* **fit_quality**: the Poisson deviance of the frame against mu, as a z-score against what
  Poisson noise alone gives at these expectations: (D - (E[D] - k)) / sqrt(Var[D]), with E and Var
  summed per pixel (:mod:`._deviance`) and k = 5 fitted parameters. About N(0, 1) on frames the
  model describes; POOR_FIT above ``poor_fit_z``.
* **thickness_z**: the score test for the film thickness at the estimate, with the other
  parameters refitted: about N(0, 1) when the film has the instrument's thickness; THICKNESS when
  |z| > ``thickness_z``. A thickness change alters the band's width, which the omnibus deviance
  is too diluted to see in one frame (1,900 pixels), while the targeted test sees 15 % in one frame
  at 7 counts.
* **Film thickness** (``thickness``: a start per frame, from a network that predicts it): the
  thickness is then a fifth free parameter of the step, ``thickness_err`` its standard deviation,
  and the other errors include what the unknown film costs. There is no score test then;
  frames too faint to say their film (``thickness_err`` above ``THICKNESS_ERR_MAX`` of the
  instrument's) are THICKNESS.
* **ring_fraction**: the share of the frame's counts on the pixels the annulus can light at the
  estimate; NO_RING below ``min_ring_fraction``.

The deviance after the last step is the one at the last evaluation minus g.F^-1.g (its quadratic
decrease), so the check costs no extra evaluation of the forward model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._schema import FLAG_DTYPE, Flag
from ..physics import FrameModel, Instrument, crlb
from ._deviance import deviance_moments, deviance_table
from ._kernel import KERNEL_LOCK, N_SUMS, frame_statistics, likelihood_sums, pack_geometry

__all__ = ["Consistency", "PhysicsCheck", "PooledConsistency"]

#: fit_quality above which a frame is POOR_FIT. 4 standard deviations; measured false-alarm rate
#: on frames the model describes: see ``tests/test_quality.py`` and ``benchmarks/robustness.py``.
POOR_FIT_Z = 4.0
#: A fitted film thickness whose standard deviation exceeds this fraction of the instrument's is
#: flagged THICKNESS: the frame is too faint to say its film (the likelihood has other optima
#: along strain and thickness there). At 2.5 % a 90 A film at 7 counts, measured right, was
#: flagged in a quarter of its frames; at 4 % it is not, and 1-count frames (42 % flagged) keep
#: honest errors (``benchmarks/robustness.py``).
THICKNESS_ERR_MAX = 0.04
#: With the film fitted, the scan's pooled film may differ from the instrument's by this fraction
#: before POOLED_MISMATCH: beyond it the frames say another film -- or the same film at another
#: energy or of another material, which a free thickness absorbs (the film at 10.8 keV instead
#: of 11.3 reads as a film 5 A thinner, chi 5 % off, every frame fitting as well as the truth).
#: The fix is to declare the film (``nanobeam calibrate``) once the instrument is known right.
THICKNESS_TOLERANCE = 0.03
#: |thickness_z| above which a frame is flagged THICKNESS.
THICKNESS_Z = 4.0
#: Fewer counts than this share on the annulus: NO_RING.
MIN_RING_FRACTION = 0.5
#: Expected counts never taken below this fraction of the count scale in the likelihood, so that a
#: pixel the model calls dark but that holds a count costs a finite amount.
FLOOR_FRACTION = 1e-4
#: Fitted parameters behind the deviance: strain, omega, chi, scale, background.
_FITTED = 5
#: "Every pixel is an observation" for the kernel.
_NO_MASK = np.zeros((0, 0), dtype=np.float32)
#: Counts at the Laue maximum beyond which the forward model's own accuracy, not the noise,
#: limits an estimate: ``*_err`` never falls below the Cramer-Rao bound at this level
#: (``benchmarks/robustness.py``: the likelihood step stays within 1.1x the bound up to 700).
ERROR_FLOOR_COUNTS = 3000.0


@dataclass
class Consistency:
    """What the check found, per frame (numpy arrays over N frames).

    Attributes:
        params: (N, 3) strain, omega, chi (deg): after the likelihood steps, or as given.
        sigma: (N, 3) their standard deviations from the Fisher information (scale and
            background fitted), for this frame's counts and mask.
        scale: (N,) fitted count scale: expected counts of a fully lit pixel at the Laue maximum.
        background: (N,) counts per binned pixel, from the pixels the annulus cannot light.
        fit_quality: (N,) deviance z-score (about N(0, 1) on frames the model describes).
        thickness_z: (N,) score-test z of the film thickness (about N(0, 1) at the right one).
        ring_fraction: (N,) share of the counts on the annulus support.
        thickness_score: (N,) d log L / d thickness at the estimate, others refitted (1/Angstrom).
        thickness_information: (N,) its variance (Fisher information, 1/Angstrom^2).
        steps: (N,) likelihood steps taken.
        flags: (N,) uint16: POOR_FIT, THICKNESS, NO_RING.
        thickness: (N,) the film thickness fitted with the others (Å) when a start was given;
            NaN otherwise (``thickness_z`` is then NaN: nothing to test).
        thickness_err: (N,) its standard deviation from the Fisher information (Å).
    """

    params: np.ndarray
    sigma: np.ndarray
    scale: np.ndarray
    background: np.ndarray
    fit_quality: np.ndarray
    thickness_z: np.ndarray
    ring_fraction: np.ndarray
    thickness_score: np.ndarray
    thickness_information: np.ndarray
    steps: np.ndarray
    flags: np.ndarray
    thickness: np.ndarray
    thickness_err: np.ndarray


@dataclass
class PooledConsistency:
    """Running pooled tests over many frames (one call of ``predict``, or one live run).

    Single frames cannot see a film a few Angstrom thicker than described, or the same film at
    another energy: per frame the shift of the thickness score is below its noise, and another
    set of (strain, omega, chi) explains the frame almost as well. Over many frames the shift
    adds up: the mean thickness z, the mean fit_quality and the mean of thickness z^2 - 1 are 0
    on frames the model describes. POOLED_MISMATCH when one of them is both large (> ``shift``
    per frame) and significant (> ``significance`` standard errors), from ``min_frames`` frames on.

    Where each frame's film is fitted (a model that predicts it), there is no score to pool; the
    weighted mean of the fitted films is compared with the instrument's film
    (``nominal_angstrom``): POOLED_MISMATCH when it differs by more than ``thickness_tolerance``
    of it, significantly. A free film absorbs another energy or material, so this is what still
    sees them.
    """

    min_frames: int = 10
    shift: float = 0.5
    significance: float = 5.0
    frames: int = 0
    sum_thickness_z: float = 0.0
    sum_thickness_z2: float = 0.0
    sum_fit_quality: float = 0.0
    sum_score: float = 0.0
    sum_information: float = 0.0
    #: Frames whose thickness was fitted: the weighted sums of their fitted films.
    fitted_frames: int = 0
    sum_weighted_thickness: float = 0.0
    sum_thickness_weight: float = 0.0
    #: The film the instrument declares (Å); set by whoever adds fitted films.
    nominal_angstrom: float | None = None
    thickness_tolerance: float = THICKNESS_TOLERANCE

    def add(self, result: Consistency, rows: np.ndarray | None = None) -> None:
        """Pool the frames ``rows`` (bool or index; default all) of a check's result."""
        sel = slice(None) if rows is None else rows
        fit_quality = result.fit_quality[sel]
        fitted = np.isfinite(result.thickness[sel]) & np.isfinite(fit_quality)
        if fitted.any():  # thickness fitted: no score test, the films themselves are pooled
            weight = 1 / np.maximum(result.thickness_err[sel][fitted], 1e-6) ** 2
            self.fitted_frames += int(fitted.sum())
            self.sum_weighted_thickness += float((weight * result.thickness[sel][fitted]).sum())
            self.sum_thickness_weight += float(weight.sum())
            self.sum_fit_quality += float(fit_quality[fitted].sum())
        z = result.thickness_z[sel]
        good = np.isfinite(z) & np.isfinite(fit_quality)
        z = z[good]
        self.frames += int(good.sum())
        self.sum_thickness_z += float(z.sum())
        self.sum_thickness_z2 += float((z**2).sum())
        self.sum_fit_quality += float(fit_quality[good].sum())
        self.sum_score += float(result.thickness_score[sel][good].sum())
        self.sum_information += float(result.thickness_information[sel][good].sum())

    @property
    def n_frames(self) -> int:
        """Frames pooled so far (tested at the instrument's film, or with their film fitted)."""
        return self.frames + self.fitted_frames

    def means(self) -> dict[str, float]:
        n = max(self.frames, 1)
        return {
            "thickness_z": self.sum_thickness_z / n,
            "fit_quality": self.sum_fit_quality / max(self.frames + self.fitted_frames, 1),
            "thickness_z2_excess": self.sum_thickness_z2 / n - 1 if self.frames else 0.0,
        }

    @property
    def mismatch(self) -> bool:
        """A pooled mean is both large and significant (each over the frames it applies to)."""
        means = self.means()
        # Standard deviations per frame: z ~ N(0, 1), z^2 - 1 has variance 2.
        tests = (
            (means["thickness_z"], 1.0, self.frames),
            (means["fit_quality"], 1.0, self.frames + self.fitted_frames),
            (means["thickness_z2_excess"], np.sqrt(2.0), self.frames),
        )
        for mean, sd, n in tests:
            if (
                n >= self.min_frames
                and abs(mean) > self.shift
                and abs(mean) * np.sqrt(n) / sd > self.significance
            ):
                return True
        if self.fitted_frames >= self.min_frames and self.nominal_angstrom:
            film, film_sd = self.thickness_estimate(self.nominal_angstrom)
            shift = abs(film - self.nominal_angstrom)
            if (
                shift > self.thickness_tolerance * self.nominal_angstrom
                and shift > self.significance * film_sd
            ):
                return True
        return False

    def thickness_estimate(self, nominal_angstrom: float) -> tuple[float, float]:
        """The film thickness the pooled frames say (Angstrom) and its standard deviation: the
        weighted mean of the fitted films, or one scoring step from the instrument's thickness."""
        if self.sum_thickness_weight > 0:
            return (
                self.sum_weighted_thickness / self.sum_thickness_weight,
                float(1 / np.sqrt(self.sum_thickness_weight)),
            )
        if self.sum_information <= 0:
            return float("nan"), float("nan")
        return (
            nominal_angstrom + self.sum_score / self.sum_information,
            float(1 / np.sqrt(self.sum_information)),
        )

    def summary(self, nominal_angstrom: float) -> dict[str, float]:
        """What the pooled tests say, for a result's attributes or a run's stop document."""
        thickness, sd = self.thickness_estimate(nominal_angstrom)
        means = {f"pooled_{k}_mean": round(v, 4) for k, v in self.means().items()}
        return {
            "pooled_frames": self.frames + self.fitted_frames,
            **means,
            "pooled_thickness_angstrom": round(thickness, 3),
            "pooled_thickness_sd_angstrom": round(sd, 3),
            "pooled_mismatch": int(self.mismatch),
        }


class PhysicsCheck:
    """Likelihood step and physics-consistency check against physics.md's forward model.

    Use :meth:`for_instrument` to share one per instrument's physics in a process (building one
    takes about a second).

    Args:
        instrument: the data's instrument (the film thickness tested is its own).
        poor_fit_z: fit_quality threshold of POOR_FIT.
        thickness_z: |thickness_z| threshold of THICKNESS.
        min_ring_fraction: ring_fraction below which a frame is NO_RING.
        max_steps: most likelihood steps per frame.
        converged_sigma: a frame whose last step moved a parameter by more than this many of its
            standard deviations takes another step.
        chunk_size: frames evaluated together (cache-sized on a CPU).
    """

    def __init__(
        self,
        instrument: Instrument,
        *,
        poor_fit_z: float = POOR_FIT_Z,
        thickness_z: float = THICKNESS_Z,
        min_ring_fraction: float = MIN_RING_FRACTION,
        max_steps: int = 6,
        converged_sigma: float = 1.0,
        chunk_size: int = 512,
    ) -> None:
        self.instrument = instrument
        self.model = FrameModel.for_instrument(instrument)
        self.poor_fit_z = poor_fit_z
        self.thickness_z = thickness_z
        self.min_ring_fraction = min_ring_fraction
        self.max_steps = max_steps
        self.converged_sigma = converged_sigma
        self.chunk_size = chunk_size
        ranges = instrument.parameter_ranges
        box = np.stack(
            np.meshgrid(*[np.linspace(lo, hi, 5) for lo, hi in ranges.values()], indexing="ij"), -1
        ).reshape(-1, 3)
        #: Smallest total intensity of a frame in the box (Laue maximum 1), for the hot-pixel test.
        self.min_frame_intensity = float(self.model.render(*box.T).sum(axis=(1, 2)).min())
        rng = np.random.default_rng(0)
        points = np.stack([rng.uniform(lo, hi, 16) for lo, hi in ranges.values()], 1)
        strains, omegas, chis = points.T
        bound = crlb(strains, omegas, chis, instrument, max_counts=ERROR_FLOOR_COUNTS, upsample=8)
        #: (strain, deg, deg): the forward model's accuracy, the least ``*_err`` can be.
        self.error_floor = np.sqrt((bound**2).mean(axis=0))
        # Largest step per parameter (a trust region): a tenth or a twentieth of the box.
        self._max_step = np.array(
            [
                0.1 * (ranges["strain"][1] - ranges["strain"][0]),
                0.05 * (ranges["omega"][1] - ranges["omega"][0]),
                0.05 * (ranges["chi"][1] - ranges["chi"][0]),
                0.05 * instrument.film_thickness_angstrom,
            ]
        )
        self._deviance = deviance_table()

    @classmethod
    def for_instrument(cls, instrument: Instrument) -> PhysicsCheck:
        """The shared check, with the default thresholds, for ``instrument``'s physics."""
        return _shared_check(instrument.physics_only())

    def __call__(
        self,
        counts: np.ndarray,
        start: np.ndarray,
        masked: np.ndarray | None = None,
        *,
        refine: bool = True,
        thickness: np.ndarray | None = None,
    ) -> Consistency:
        """Check (and with ``refine``, improve) estimates ``start`` (N, 3) of frames ``counts``.

        Args:
            counts: (N, F, F) binned counts in physics.md's frame (float32).
            start: (N, 3) strain, omega (deg), chi (deg); finite.
            masked: (N, F, F) bool, True where a pixel is not an observation; or None.
            refine: take likelihood steps in (strain, omega, chi); False keeps the estimate and
                fits only the count scale (how a fit's result is checked).
            thickness: (N,) a start for each frame's film thickness (Å), e.g. a network's: with
                ``refine``, the thickness is fitted too (``thickness``, ``thickness_err``) and
                the other errors include what the unknown film costs. None: the instrument's
                film, tested by the score test (``thickness_z``).
        """
        n = len(counts)
        fit_thickness = thickness is not None and refine
        nominal = self.instrument.film_thickness_angstrom
        first = np.full(n, nominal)
        if fit_thickness:
            # a start outside what a film can be (the network's, far out of its box) is brought in
            first = np.clip(
                np.nan_to_num(np.asarray(thickness, dtype=np.float64), nan=nominal), nominal / 3, 3 * nominal
            )
        out = Consistency(
            params=np.array(start, dtype=np.float64, copy=True),
            sigma=np.full((n, 3), np.nan),
            scale=np.full(n, np.nan),
            background=np.full(n, np.nan),
            fit_quality=np.full(n, np.nan),
            thickness_z=np.full(n, np.nan),
            ring_fraction=np.full(n, np.nan),
            thickness_score=np.full(n, np.nan),
            thickness_information=np.full(n, np.nan),
            steps=np.zeros(n, dtype=np.int64),
            flags=np.zeros(n, dtype=FLAG_DTYPE),
            thickness=np.full(n, np.nan),
            thickness_err=np.full(n, np.nan),
        )
        for lo in range(0, n, self.chunk_size):
            hi = min(n, lo + self.chunk_size)
            self._chunk(
                counts[lo:hi],
                None if masked is None else masked[lo:hi],
                out,
                lo,
                refine,
                first[lo:hi],
                fit_thickness,
            )
        flags = np.zeros(n, dtype=FLAG_DTYPE)
        flags[out.fit_quality > self.poor_fit_z] |= FLAG_DTYPE(Flag.POOR_FIT)
        flags[np.abs(out.thickness_z) > self.thickness_z] |= FLAG_DTYPE(Flag.THICKNESS)
        if fit_thickness:
            flags[~(out.thickness_err <= THICKNESS_ERR_MAX * nominal)] |= FLAG_DTYPE(Flag.THICKNESS)
        flags[~(out.ring_fraction >= self.min_ring_fraction)] |= FLAG_DTYPE(Flag.NO_RING)
        out.flags = flags
        return out

    # ------------------------------------------------------------------ one chunk
    def _chunk(
        self,
        counts: np.ndarray,
        masked: np.ndarray | None,
        out: Consistency,
        lo: int,
        refine: bool,
        thickness: np.ndarray,
        fit_thickness: bool,
    ) -> None:
        b_frames = len(counts)
        flat, observed, total_counts, total_pixels, total_nlogn = _frame_arrays(counts, masked)
        nominal = self.instrument.film_thickness_angstrom
        # (strain, omega, chi, thickness): the thickness stays where it starts unless fitted
        theta = np.concatenate([out.params[lo : lo + b_frames], thickness[:, None]], axis=1)
        scale = np.full(b_frames, np.nan)  # NaN: estimate it from the counts
        accepted = theta.copy()  # the last point whose deviance did not rise
        accepted_deviance = np.full(b_frames, np.inf)
        todo = np.arange(b_frames)
        steps = np.zeros(b_frames, dtype=np.int64)
        results: dict[str, np.ndarray] = {}
        for _ in range(self.max_steps if refine else 1):
            obs = observed if masked is None else observed[todo]
            state = self._evaluate(
                theta[todo],
                fit_thickness,
                scale[todo],
                flat[todo],
                obs,
                total_counts[todo],
                total_pixels[todo],
                total_nlogn[todo],
                refine,
            )
            steps[todo] += 1
            # A step that raised the deviance overshot (far from the maximum, where the quadratic
            # model is poor): go back half way instead.
            worse = state["deviance_here"] > accepted_deviance[todo] + 1e-9 * np.abs(accepted_deviance[todo])
            keep = ~worse
            ok = todo[keep]
            for key, value in state.items():
                if key not in results:
                    results[key] = np.zeros((b_frames, *value.shape[1:]))
                results[key][ok] = value[keep]
            scale[ok] = state["scale"][keep]
            accepted[ok] = theta[ok]
            accepted_deviance[ok] = state["deviance_here"][keep]
            back = todo[worse]
            theta[back] = (accepted[back] + theta[back]) / 2
            if not refine:
                break
            delta = state["delta"][keep][:, [0, 1, 2, 4]]  # the scale is refitted at every point
            step = np.clip(delta, -self._max_step, self._max_step)
            theta[ok] += step
            # the film stays within the physically sensible (a third to three times the nominal)
            theta[ok, 3] = np.clip(theta[ok, 3], nominal / 3, 3 * nominal)
            sigma4 = np.concatenate([state["sigma"][keep], state["thickness_err"][keep, None]], axis=1)
            # Another step where this one was large: the start was far from the maximum.
            with np.errstate(invalid="ignore"):
                ratio = (np.abs(delta) / sigma4)[:, : 4 if fit_thickness else 3]
                far = (ratio > self.converged_sigma).any(1)
            far |= (step != delta).any(1)
            todo = np.concatenate([ok[far], back])
            if not len(todo):
                break
        if len(todo):  # out of steps while backing off: report the last accepted point
            theta[todo] = accepted[todo]
        sl = slice(lo, lo + b_frames)
        out.params[sl] = theta[:, :3]
        if fit_thickness:
            out.thickness[sl] = theta[:, 3]
            out.thickness_err[sl] = results["thickness_err"]
        for key in (
            "sigma",
            "scale",
            "background",
            "fit_quality",
            "thickness_z",
            "ring_fraction",
            "thickness_score",
            "thickness_information",
        ):
            getattr(out, key)[sl] = results[key]
        out.steps[sl] = steps if refine else 0

    def _evaluate(
        self,
        theta: np.ndarray,
        fit_thickness: bool,
        scale: np.ndarray,
        flat: np.ndarray,
        observed: np.ndarray,
        total_counts: np.ndarray,
        total_pixels: np.ndarray,
        total_nlogn: np.ndarray,
        refine: bool,
        gradient: bool = False,
    ) -> dict[str, np.ndarray]:
        """One evaluation of the forward model at ``theta`` (B, 4: strain, omega, chi, thickness):
        the step and the check there.

        ``scale`` (B,) is the count scale, NaN where it is to be estimated from the counts;
        ``fit_thickness``: the thickness is a free parameter of the step.
        """
        fm = self.model
        arrays = fm.arrays
        geometry = fm.geometry(theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3])
        sums = np.empty((len(theta), N_SUMS))
        with KERNEL_LOCK:
            likelihood_sums(
                flat,
                observed,
                fm.frame_pixels,
                arrays["support_row"],
                arrays["support_col"],
                arrays["u0"],
                arrays["v0"],
                arrays["m0"],
                arrays["mu"],
                arrays["mv"],
                geometry.corner,
                pack_geometry(geometry),
                scale,
                total_counts,
                total_pixels,
                arrays["phases"],
                arrays["two_k"],
                arrays["k_px"],
                FLOOR_FRACTION,
                *self._deviance,
                sums,
            )
        grad = sums[:, :5]
        fisher = sums[:, 5:30].reshape(-1, 5, 5)
        (half_dev, dev_mean, dev_var, n_support, p_support, nlogn_support, scale_used, background) = sums[
            :, 30:
        ].T
        free = slice(0, 5 if fit_thickness else 4) if refine else slice(3, 4)
        cov_free = _safe_inverse(fisher[:, free, free])
        g_free = grad[:, free]
        delta_free = np.nan_to_num(np.einsum("bij,bj->bi", cov_free, g_free))
        delta = np.zeros((len(theta), 5))
        delta[:, free] = delta_free
        cov4 = _safe_inverse(fisher[:, :4, :4])
        cov_all = _safe_inverse(fisher) if fit_thickness else cov4
        sigma = np.sqrt(np.clip(np.diagonal(cov_all, axis1=1, axis2=2)[:, :3], 0, None))
        thickness_err = (
            np.sqrt(np.clip(cov_all[:, 4, 4], 0, None)) if fit_thickness else np.full(len(theta), np.nan)
        )
        # Off the support the expectation is the background alone.
        n_off = np.clip(total_counts - n_support, 0, None)
        p_off = np.clip(total_pixels - p_support, 0, None)
        floor = FLOOR_FRACTION * scale_used
        with np.errstate(divide="ignore", invalid="ignore"):
            off = (
                (total_nlogn - nlogn_support)
                - n_off * np.log(np.maximum(background, floor))
                - n_off
                + p_off * background
            )
        deviance_here = 2 * (half_dev + off)
        deviance = deviance_here - (g_free * delta_free).sum(1)  # after the step
        mean_off, var_off = deviance_moments(np.maximum(background, 1e-6))
        expected = dev_mean + p_off * mean_off
        variance = dev_var + p_off * var_off
        fitted = _FITTED + (1 if fit_thickness else 0)
        fit_quality = (deviance - (expected - fitted)) / np.sqrt(np.maximum(variance, 1e-12))
        # Thickness score test at the stepped estimate, the other parameters refitted (nothing to
        # test when the thickness is itself fitted).
        cross = fisher[:, 4, :4]
        if fit_thickness:
            score = np.full(len(theta), np.nan)
            residual_info = np.full(len(theta), np.nan)
        else:
            score = grad[:, 4] - np.einsum("bi,bi->b", cross[:, free], delta_free)
            residual_info = fisher[:, 4, 4] - np.einsum("bi,bij,bj->b", cross, cov4, cross)
        thickness_z = score / np.sqrt(np.maximum(residual_info, 1e-30))
        with np.errstate(divide="ignore", invalid="ignore"):
            ring = np.where(total_counts > 0, n_support / total_counts, 0.0)
        return {
            "delta": delta,
            "sigma": sigma,
            "scale": np.maximum(scale_used + delta[:, 3], 1e-6),
            "deviance_here": deviance_here,
            "background": background,
            "fit_quality": fit_quality,
            "thickness_z": thickness_z,
            "ring_fraction": ring,
            "thickness_score": score,
            "thickness_information": residual_info,
            "thickness_err": thickness_err,
            **({"gradient": grad} if gradient else {}),
        }

    def log_likelihood_gradient(
        self, counts: np.ndarray, params: np.ndarray, masked: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The Poisson log-likelihood's gradient at ``params`` (N, 4: strain, omega deg, chi deg,
        thickness Å), the count scale and background at their best for each frame, and the
        deviance there: ((N, 4) d log L / d params, (N,) deviance). What self-supervised
        adaptation descends (``nanobeam adapt``)."""
        theta = np.asarray(params, dtype=np.float64)
        flat, observed, total_counts, total_pixels, total_nlogn = _frame_arrays(counts, masked)
        state = self._evaluate(
            theta,
            True,
            np.full(len(theta), np.nan),
            flat,
            observed,
            total_counts,
            total_pixels,
            total_nlogn,
            True,
            gradient=True,
        )
        return state["gradient"][:, [0, 1, 2, 4]], state["deviance_here"]


def _frame_arrays(
    counts: np.ndarray, masked: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the kernel needs of frames: flattened counts (masked pixels zeroed), the observed
    pixels (or none), and per frame the total counts, pixels and sum of n log n."""
    b_frames = len(counts)
    flat = np.ascontiguousarray(counts, dtype=np.float32).reshape(b_frames, -1)
    if masked is None:
        observed = _NO_MASK
        total_pixels = np.full(b_frames, float(flat.shape[1]))
    else:
        keep = ~masked.reshape(b_frames, -1)
        flat = np.where(keep, flat, np.float32(0))
        observed = keep.astype(np.float32)
        total_pixels = keep.sum(1).astype(np.float64)
    stats = np.empty((b_frames, 6))
    with KERNEL_LOCK:
        frame_statistics(flat, True, False, stats)
    return flat, observed, stats[:, 0], total_pixels, stats[:, 3]


def _safe_inverse(matrices: np.ndarray) -> np.ndarray:
    """Inverses of (B, k, k) matrices; NaN where one is singular."""
    out = np.full(matrices.shape, np.nan)
    good = np.isfinite(matrices).all(axis=(1, 2)) & (np.abs(np.linalg.det(matrices)) > 0)
    if good.any():
        out[good] = np.linalg.inv(matrices[good])
    return out


@functools.lru_cache(maxsize=8)
def _shared_check(instrument: Instrument) -> PhysicsCheck:
    return PhysicsCheck(instrument)
