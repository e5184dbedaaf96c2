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
* **ring_fraction**: the share of the frame's counts on the pixels the annulus can light at the
  estimate; NO_RING below ``min_ring_fraction``.

The deviance after the last step is the one at the last evaluation minus g.F^-1.g (its quadratic
decrease), so the check costs no extra evaluation of the forward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..physics import FrameModel, Instrument, crlb
from ._deviance import unit_deviance_moments
from ._flags import FLAG_DTYPE, Flag

__all__ = ["Consistency", "PhysicsCheck", "PooledConsistency"]

#: fit_quality above which a frame is POOR_FIT. 4 standard deviations; measured false-alarm rate
#: on frames the model describes: see ``tests/test_quality.py`` and ``benchmarks/robustness.py``.
POOR_FIT_Z = 4.0
#: |thickness_z| above which a frame is flagged THICKNESS.
THICKNESS_Z = 4.0
#: Fewer counts than this share on the annulus: NO_RING.
MIN_RING_FRACTION = 0.5
#: Expected counts never taken below this fraction of the count scale in the likelihood, so that a
#: pixel the model calls dark but that holds a count costs a finite amount.
FLOOR_FRACTION = 1e-4
#: Fitted parameters behind the deviance: strain, omega, chi, scale, background.
_FITTED = 5
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


@dataclass
class PooledConsistency:
    """Running pooled tests over many frames (one call of ``predict``, or one live run).

    Single frames cannot see a film a few Angstrom thicker than described, or the same film at
    another energy: per frame the shift of the thickness score is below its noise, and another
    set of (strain, omega, chi) explains the frame almost as well. Over many frames the shift
    adds up: the mean thickness z, the mean fit_quality and the mean of thickness z^2 - 1 are 0
    on frames the model describes. POOLED_MISMATCH when one of them is both large (> ``shift``
    per frame) and significant (> ``significance`` standard errors), from ``min_frames`` frames on.
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

    def add(self, result: Consistency, rows: np.ndarray | None = None) -> None:
        """Pool the frames ``rows`` (bool or index; default all) of a check's result."""
        sel = slice(None) if rows is None else rows
        z = result.thickness_z[sel]
        good = np.isfinite(z) & np.isfinite(result.fit_quality[sel])
        z = z[good]
        self.frames += int(good.sum())
        self.sum_thickness_z += float(z.sum())
        self.sum_thickness_z2 += float((z**2).sum())
        self.sum_fit_quality += float(result.fit_quality[sel][good].sum())
        self.sum_score += float(result.thickness_score[sel][good].sum())
        self.sum_information += float(result.thickness_information[sel][good].sum())

    def means(self) -> dict[str, float]:
        n = max(self.frames, 1)
        return {"thickness_z": self.sum_thickness_z / n, "fit_quality": self.sum_fit_quality / n,
                "thickness_z2_excess": self.sum_thickness_z2 / n - 1}

    @property
    def mismatch(self) -> bool:
        if self.frames < self.min_frames:
            return False
        root_n = np.sqrt(self.frames)
        # Standard deviations per frame: z ~ N(0, 1), z^2 - 1 has variance 2.
        for mean, sd in zip(self.means().values(), (1.0, 1.0, np.sqrt(2.0)), strict=True):
            if abs(mean) > self.shift and abs(mean) * root_n / sd > self.significance:
                return True
        return False

    def thickness_estimate(self, nominal_angstrom: float) -> tuple[float, float]:
        """The film thickness the pooled frames say (Angstrom) and its standard deviation: one
        scoring step from the instrument's thickness."""
        if self.sum_information <= 0:
            return float("nan"), float("nan")
        return (nominal_angstrom + self.sum_score / self.sum_information,
                float(1 / np.sqrt(self.sum_information)))

    def summary(self, nominal_angstrom: float) -> dict[str, float]:
        """What the pooled tests say, for a result's attributes or a run's stop document."""
        thickness, sd = self.thickness_estimate(nominal_angstrom)
        means = {f"pooled_{k}_mean": round(v, 4) for k, v in self.means().items()}
        return {"pooled_frames": self.frames, **means, "pooled_thickness_angstrom": round(thickness, 3),
                "pooled_thickness_sd_angstrom": round(sd, 3), "pooled_mismatch": int(self.mismatch)}


class PhysicsCheck:
    """Likelihood step and physics-consistency check against physics.md's forward model.

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

    def __init__(self, instrument: Instrument, *, poor_fit_z: float = POOR_FIT_Z,
                 thickness_z: float = THICKNESS_Z, min_ring_fraction: float = MIN_RING_FRACTION,
                 max_steps: int = 4, converged_sigma: float = 1.5, chunk_size: int = 128) -> None:
        self.instrument = instrument
        self.model = FrameModel.for_instrument(instrument)
        self.poor_fit_z = poor_fit_z
        self.thickness_z = thickness_z
        self.min_ring_fraction = min_ring_fraction
        self.max_steps = max_steps
        self.converged_sigma = converged_sigma
        self.chunk_size = chunk_size
        ranges = instrument.parameter_ranges
        box = np.stack(np.meshgrid(*[np.linspace(lo, hi, 5) for lo, hi in ranges.values()],
                                   indexing="ij"), -1).reshape(-1, 3)
        #: Smallest total intensity of a frame in the box (Laue maximum 1), for the hot-pixel test.
        self.min_frame_intensity = float(self.model.render(*box.T).sum(axis=(1, 2)).min())
        rng = np.random.default_rng(0)
        points = np.stack([rng.uniform(lo, hi, 16) for lo, hi in ranges.values()], 1)
        bound = crlb(*points.T, instrument, max_counts=ERROR_FLOOR_COUNTS, upsample=8)
        #: (strain, deg, deg): the forward model's accuracy, the least ``*_err`` can be.
        self.error_floor = np.sqrt((bound**2).mean(axis=0))
        # Largest step per parameter (a trust region): a tenth or a twentieth of the box.
        self._max_step = torch.tensor([
            0.1 * (ranges["strain"][1] - ranges["strain"][0]),
            0.05 * (ranges["omega"][1] - ranges["omega"][0]),
            0.05 * (ranges["chi"][1] - ranges["chi"][0]),
        ], dtype=torch.float64)

    def __call__(self, counts: np.ndarray, start: np.ndarray, masked: np.ndarray | None = None, *,
                 refine: bool = True) -> Consistency:
        """Check (and with ``refine``, improve) estimates ``start`` (N, 3) of frames ``counts``.

        Args:
            counts: (N, F, F) binned counts in physics.md's frame (float32).
            start: (N, 3) strain, omega (deg), chi (deg); finite.
            masked: (N, F, F) bool, True where a pixel is not an observation; or None.
            refine: take likelihood steps in (strain, omega, chi); False keeps the estimate and
                fits only the count scale (how a fit's result is checked).
        """
        n = len(counts)
        out = Consistency(
            params=np.array(start, dtype=np.float64, copy=True), sigma=np.full((n, 3), np.nan),
            scale=np.full(n, np.nan), background=np.full(n, np.nan), fit_quality=np.full(n, np.nan),
            thickness_z=np.full(n, np.nan), ring_fraction=np.full(n, np.nan),
            thickness_score=np.full(n, np.nan), thickness_information=np.full(n, np.nan),
            steps=np.zeros(n, dtype=np.int64), flags=np.zeros(n, dtype=FLAG_DTYPE))
        with torch.inference_mode():
            for lo in range(0, n, self.chunk_size):
                hi = min(n, lo + self.chunk_size)
                self._chunk(counts[lo:hi], None if masked is None else masked[lo:hi], out, lo, refine)
        flags = np.zeros(n, dtype=FLAG_DTYPE)
        flags[out.fit_quality > self.poor_fit_z] |= FLAG_DTYPE(Flag.POOR_FIT)
        flags[np.abs(out.thickness_z) > self.thickness_z] |= FLAG_DTYPE(Flag.THICKNESS)
        flags[~(out.ring_fraction >= self.min_ring_fraction)] |= FLAG_DTYPE(Flag.NO_RING)
        out.flags = flags
        return out

    # ------------------------------------------------------------------ one chunk
    def _chunk(self, counts: np.ndarray, masked: np.ndarray | None, out: Consistency, lo: int,
               refine: bool) -> None:
        fm = self.model
        x = torch.as_tensor(counts, dtype=torch.float32)
        b_frames = len(x)
        flat = x.reshape(b_frames, -1)
        if masked is None:
            observed = None
            total_pixels = torch.full((b_frames,), float(flat.shape[1]))
        else:
            observed = torch.as_tensor(~masked, dtype=torch.float32).reshape(b_frames, -1)
            flat = flat * observed
            total_pixels = observed.sum(1)
        padded_n = fm.pad_frames(flat.reshape(x.shape))
        padded_o = None if observed is None else fm.pad_frames(observed.reshape(x.shape))
        total_n = flat.sum(1)
        total_nlogn = _xlogx(flat).sum(1)

        theta = torch.as_tensor(out.params[lo : lo + b_frames], dtype=torch.float64).clone()
        scale = torch.full((b_frames,), float("nan"), dtype=torch.float64)  # NaN: estimate it
        todo = torch.arange(b_frames)
        steps = torch.zeros(b_frames, dtype=torch.long)
        results: dict[str, torch.Tensor] = {}
        for _ in range(self.max_steps if refine else 1):
            state = self._evaluate(theta[todo], scale[todo], padded_n[todo],
                                   None if padded_o is None else padded_o[todo],
                                   total_n[todo], total_pixels[todo], total_nlogn[todo], refine)
            for key, value in state.items():
                if key not in results:
                    results[key] = torch.zeros((b_frames, *value.shape[1:]), dtype=value.dtype)
                results[key][todo] = value
            scale[todo] = state["scale"]
            steps[todo] += 1
            if not refine:
                break
            delta = state["delta"][:, :3]
            step = delta.clamp(-self._max_step, self._max_step)
            theta[todo] += step
            # Another step where this one was large: the start was far from the maximum.
            far = ((delta.abs() / state["sigma"]) > self.converged_sigma).any(1) | (step != delta).any(1)
            todo = todo[far]
            if not len(todo):
                break
        sl = slice(lo, lo + b_frames)
        out.params[sl] = theta.numpy()
        out.sigma[sl] = results["sigma"].numpy()
        out.scale[sl] = results["scale"].numpy()
        out.background[sl] = results["background"].numpy()
        out.fit_quality[sl] = results["fit_quality"].numpy()
        out.thickness_z[sl] = results["thickness_z"].numpy()
        out.ring_fraction[sl] = results["ring_fraction"].numpy()
        out.thickness_score[sl] = results["thickness_score"].numpy()
        out.thickness_information[sl] = results["thickness_information"].numpy()
        out.steps[sl] = steps.numpy() if refine else 0

    def _evaluate(self, theta: torch.Tensor, scale: torch.Tensor, padded_n: torch.Tensor,
                  padded_o: torch.Tensor | None, total_n: torch.Tensor, total_pixels: torch.Tensor,
                  total_nlogn: torch.Tensor, refine: bool) -> dict[str, torch.Tensor]:
        """One evaluation of the forward model at ``theta`` (B, 3): the step and the check there.

        ``scale`` (B,) is the count scale, NaN where it is to be estimated from the counts.
        """
        fm = self.model
        b_frames = len(theta)
        ones = torch.ones(b_frames, dtype=torch.float64)
        ev = fm.evaluate(theta[:, 0].contiguous(), theta[:, 1].contiguous(), theta[:, 2].contiguous(),
                         ones, torch.zeros(b_frames, dtype=torch.float64))
        n = torch.gather(padded_n, 1, ev.index)
        obs = ev.inside.to(torch.float32)
        if padded_o is not None:
            obs = obs * torch.gather(padded_o, 1, ev.index)
        n_support = (n * obs).sum(1)
        p_support = obs.sum(1)
        n_off = (total_n - n_support).clamp(min=0)
        p_off = (total_pixels - p_support).clamp(min=0)
        background = torch.where(p_off > 0, n_off / p_off.clamp(min=1), torch.zeros_like(n_off))
        intensity = ev.intensity * obs
        moment = ((n_support - background * p_support) / intensity.sum(1).clamp(min=1e-12)).double()
        scale = torch.where(torch.isnan(scale), moment.clamp(min=1e-6), scale)
        s32 = scale.to(torch.float32)[:, None]
        mu = s32 * ev.intensity + background[:, None]
        floor = FLOOR_FRACTION * s32
        mu_fit = mu + floor
        # Jacobian over the support: strain, omega, chi, scale, then thickness (for its test only).
        jac = torch.stack([ev.d_strain * s32, ev.d_omega * s32, ev.d_chi * s32, ev.intensity,
                           ev.d_thickness * s32], 1) * obs[:, None]
        weight = (n / mu_fit - 1) * obs
        grad = torch.einsum("bip,bp->bi", jac, weight).double()
        fisher = torch.einsum("bip,bjp->bij", jac / mu_fit[:, None], jac).double()
        free = slice(0, 4) if refine else slice(3, 4)
        f_free = fisher[:, free, free]
        g_free = grad[:, free]
        cov_free, info = torch.linalg.inv_ex(f_free)
        bad = info != 0
        delta_free = torch.einsum("bij,bj->bi", cov_free, g_free)
        delta_free[bad] = 0
        delta = torch.zeros(b_frames, 4, dtype=torch.float64)
        delta[:, free] = delta_free
        # Standard deviations of strain, omega, chi with the count scale fitted.
        cov4, info4 = torch.linalg.inv_ex(fisher[:, :4, :4])
        sigma = torch.sqrt(torch.diagonal(cov4, dim1=1, dim2=2)[:, :3].clamp(min=0))
        sigma[info4 != 0] = float("nan")
        # Deviance here, then its quadratic decrease over the step.
        mu_dev = torch.maximum(mu, floor)
        term = torch.where(n > 0, _xlogy(n, mu_dev) - n + mu, mu) * obs
        nlogn_support = (_xlogx(n) * obs).sum(1)
        b_dev = torch.maximum(background, floor[:, 0])
        off = (total_nlogn - nlogn_support) - n_off * torch.log(b_dev) - n_off + p_off * background
        deviance = 2 * (term.sum(1) + off).double() - (g_free * delta_free).sum(1)
        mean, var = unit_deviance_moments(mu.clamp(min=1e-6))
        mean_off, var_off = unit_deviance_moments(background.clamp(min=1e-6))
        expected = ((mean * obs).sum(1) + p_off * mean_off).double()
        variance = ((var * obs).sum(1) + p_off * var_off).double()
        fit_quality = (deviance - (expected - _FITTED)) / torch.sqrt(variance.clamp(min=1e-12))
        # Thickness score test at the stepped estimate, the other parameters refitted.
        cross = fisher[:, 4, :4]
        score = grad[:, 4] - torch.einsum("bi,bi->b", cross[:, free], delta_free)
        f4inv = cov4
        residual_info = fisher[:, 4, 4] - torch.einsum("bi,bij,bj->b", cross, f4inv, cross)
        thickness_z = score / torch.sqrt(residual_info.clamp(min=1e-30))
        ring = torch.where(total_n > 0, n_support / total_n.clamp(min=1e-12), torch.zeros_like(total_n))
        return {"delta": delta, "sigma": sigma, "scale": (scale + delta[:, 3]).clamp(min=1e-6),
                "background": background.double(), "fit_quality": fit_quality,
                "thickness_z": thickness_z, "ring_fraction": ring.double(), "thickness_score": score,
                "thickness_information": residual_info}


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp(min=1e-30)), torch.zeros_like(x))


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * torch.log(x.clamp(min=1e-30) / y)
