"""Expected counts of a frame near given parameters, with derivatives, at live speed.

The physics check and the likelihood step after the network evaluate the forward model at every
prediction, with its derivatives. The fast path of :mod:`.forward` recomputes the annulus mask
sub-row by sub-row for every new pair of tilts (about 0.5 ms per frame); here the tilts enter the
mask only through the position of the annulus, which is what makes it cheap:

* The tilts move the image of the zone-plate annulus rigidly: its centre is where the mirrored
  central ray (the z axis reflected by the tilted film) meets the detector. Over the whole
  parameter box the mask moved to that centre agrees with the mask computed at the tilts to one
  sub-pixel of the 16 x 16 sampling (checked in the tests).
* So the mask and its first moments are tabulated once per instrument on a grid of sub-pixel
  positions of the annulus centre (``phases`` per pixel and axis, bilinear in between), sampled
  with ``upsample`` x ``upsample`` sub-pixels, and moved by whole pixels to the frame.
* The Laue intensity is evaluated exactly at every pixel centre, with the same first-order
  correction inside the pixel as the fast path, from the momentum transfer of the tilted normal.
* The instrument's ``beam_centre_offset_px`` moves the whole pattern (physics.md's beam-centre
  offset): the simulator has no such option, the networks assume none.

Everything is computed on the pixels that the annulus can light (its "support", in coordinates
centred on the annulus): outside them the expected counts are the background alone.

Derivatives: strain and thickness act on the Laue argument only; the tilts act on the Laue
argument and move the mask (the bilinear table's slope times the motion of the annulus centre).
Second-order pieces of the in-pixel correction are left out of the derivatives (they change
where Gauss-Newton converges by nothing and the Fisher information by < 1 %).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .forward import _mask_moments, _normals, _PixelGrid, lab_geometry
from .instrument import Instrument

__all__ = ["ExpectedFrames", "FrameGeometry", "FrameModel", "annulus_centre_px"]


def annulus_centre_px(omega_deg, chi_deg, instrument: Instrument) -> tuple[np.ndarray, np.ndarray]:
    """Centre of the annulus image relative to the detector centre: (columns, rows), binned pixels.

    It is where the incident central ray (the z axis), mirrored by the tilted film, meets the
    detector: physics.md's 2 omega R / delta along columns and about 2 sin(theta_B) chi R / delta
    along rows, to all orders.
    """
    normals = _normals(
        np.atleast_1d(np.asarray(omega_deg, dtype=np.float64)),
        np.atleast_1d(np.asarray(chi_deg, dtype=np.float64)),
        instrument.bragg_angle_rad,
    )
    geo = lab_geometry(instrument)
    nz = normals[:, 2]
    reflected = -2 * nz[:, None] * normals
    reflected[:, 2] += 1.0  # z - 2 (z . n) n
    along = reflected @ geo.k_out0
    scale = instrument.detector_distance_m / instrument.binned_pixel_m / along
    return scale * (reflected @ geo.e_col), scale * (reflected @ geo.e_row)


@dataclass
class FrameGeometry:
    """Per-frame quantities of :meth:`FrameModel.geometry` (numpy float64 arrays over N frames).

    Attributes:
        rows, cols: whole-pixel shift of the annulus (int64).
        corner: table entry of the sub-pixel cell's lower corner (int64); fa, fb: the position
            inside it (columns, rows), in [0, 1].
        du_dw, dv_dw, du_dc, dv_dc: motion of the annulus centre (binned pixels per degree of
            omega and chi, along columns u and rows v).
        shift_u, shift_v: the shift's offset of the pixel centres, over R.
        normal, normal_d_omega, normal_d_chi: (N, 3) the tilted film normal and its derivatives
            (per degree) against (k_out0, e_col, e_row).
        offset: 2 k (n . k_out0) - G(strain), 1/Angstrom.
        half_t: half the film thickness, Angstrom; dx_dstrain: d (Laue argument) / d strain.
    """

    rows: np.ndarray
    cols: np.ndarray
    corner: np.ndarray
    fa: np.ndarray
    fb: np.ndarray
    du_dw: np.ndarray
    dv_dw: np.ndarray
    du_dc: np.ndarray
    dv_dc: np.ndarray
    shift_u: np.ndarray
    shift_v: np.ndarray
    normal: np.ndarray
    normal_d_omega: np.ndarray
    normal_d_chi: np.ndarray
    offset: np.ndarray
    half_t: np.ndarray
    dx_dstrain: np.ndarray


@dataclass
class ExpectedFrames:
    """Expected counts of a batch of frames on the annulus support, with their derivatives.

    All arrays are float32 (B, S) over the support pixels, except ``index`` (int64 (B, S): the
    pixels' flat index in the frame padded by ``pad`` on every side) and ``inside`` (bool (B, S):
    the pixel lies on the frame). Derivatives are per unit of each parameter: strain (1), omega
    and chi (deg), thickness (Angstrom); d mu / d scale is ``intensity`` and d mu / d background
    is 1.
    """

    mu: torch.Tensor
    intensity: torch.Tensor
    d_strain: torch.Tensor
    d_omega: torch.Tensor
    d_chi: torch.Tensor
    d_thickness: torch.Tensor
    index: torch.Tensor
    inside: torch.Tensor


class FrameModel:
    """The forward model of physics.md near given parameters, fast, for checks and likelihood steps.

    Args:
        instrument: the instrument (its film thickness is the default thickness).
        phases: tabulated sub-pixel positions of the annulus per pixel and axis.
        upsample: sub-pixels per binned pixel and axis used for the tabulated mask.

    Use :meth:`for_instrument` to share one table per instrument in a process (building it takes
    about a second).
    """

    @classmethod
    def for_instrument(cls, instrument: Instrument) -> FrameModel:
        """One shared model per instrument's physics (the table is built once per process)."""
        return _shared_model(instrument.physics_only())

    def __init__(self, instrument: Instrument, *, phases: int = 16, upsample: int = 32) -> None:
        self.instrument = instrument
        self.phases = int(phases)
        f = instrument.frame_pixels
        self.frame_pixels = f
        geo = lab_geometry(instrument)
        self._sin_theta = math.sin(geo.theta_b)
        self._two_k = 2 * instrument.k_inv_angstrom
        self._g0 = 2 * math.pi * instrument.reflection_l / instrument.lattice_c_angstrom
        self._pixel_over_r = instrument.binned_pixel_m / instrument.detector_distance_m
        # Annulus centre motion per degree at zero tilt (for the table's tilts).
        d = 1e-4
        u_w, _ = annulus_centre_px([d, -d], [0.0, 0.0], instrument)
        _, v_c = annulus_centre_px([0.0, 0.0], [d, -d], instrument)
        per_deg = np.array([(u_w[0] - u_w[1]) / (2 * d), (v_c[0] - v_c[1]) / (2 * d)])
        ranges = instrument.parameter_ranges
        reach = max(
            abs(np.array(ranges["omega"])).max() * per_deg[0], abs(np.array(ranges["chi"])).max() * per_deg[1]
        )
        #: Whole-pixel shifts are clipped to this (far outside the box: the fit is then poor).
        self.pad = math.ceil(reach + max(map(abs, instrument.beam_centre_offset_px))) + 4

        # Tilts whose annulus centre sits at each tabulated sub-pixel position (a cols, b rows).
        steps = np.linspace(-0.5, 0.5, self.phases + 1)
        a, b = (g.ravel() for g in np.meshgrid(steps, steps, indexing="ij"))  # entry = ia * (P+1) + ib
        omega, chi = a / per_deg[0], b / per_deg[1]
        for _ in range(3):  # Newton on the exact centre (the map is linear to 1e-4 pixel here)
            u, v = annulus_centre_px(omega, chi, instrument)
            omega, chi = omega + (a - u) / per_deg[0], chi + (b - v) / per_deg[1]
        normals = _normals(omega, chi, geo.theta_b)
        grid = _PixelGrid(f, instrument.binned_pixel_m, int(upsample))
        m0, mu, mv = (
            torch.cat(parts)
            for parts in zip(
                *(
                    _mask_moments(normals[i : i + 64], instrument, grid, torch.device("cpu"))
                    for i in range(0, len(normals), 64)
                ),
                strict=True,
            )
        )
        support = (m0 > 0).any(0).reshape(-1).nonzero()[:, 0]
        self.support = support
        self._m0 = m0.reshape(len(m0), -1)[:, support].contiguous()
        self._mu = mu.reshape(len(mu), -1)[:, support].contiguous()
        self._mv = mv.reshape(len(mv), -1)[:, support].contiguous()
        rows, cols = support // f, support % f
        wp = f + 2 * self.pad
        self._base_index = (rows + self.pad) * wp + cols + self.pad
        self._row_px = rows
        self._col_px = cols
        # Pixel centre offsets from the detector centre over R, for a zero shift.
        self._u0 = ((cols.double() + 0.5 - f / 2) * self._pixel_over_r).float()
        self._v0 = ((rows.double() + 0.5 - f / 2) * self._pixel_over_r).float()

    @property
    def support_size(self) -> int:
        return len(self.support)

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray | float]:
        """The tables (numpy arrays) and per-pixel constants (numbers), for fused kernels."""
        return {
            "support_row": self._row_px.numpy(),
            "support_col": self._col_px.numpy(),
            "u0": self._u0.double().numpy(),
            "v0": self._v0.double().numpy(),
            "m0": self._m0.numpy(),
            "mu": self._mu.numpy(),
            "mv": self._mv.numpy(),
            "two_k": self._two_k,
            "k_px": self._two_k * self._pixel_over_r,
            "phases": self.phases,
        }

    def pad_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, F) -> (B, (F + 2 pad)^2): zero-padded and flattened, to gather support pixels."""
        p = self.pad
        return torch.nn.functional.pad(frames, (p, p, p, p)).flatten(1)

    def geometry(self, strain, omega_deg, chi_deg, thickness_angstrom=None) -> FrameGeometry:
        """Everything per frame that the per-pixel work needs (numpy float64 arrays over N).

        Args: strain (1), omega and chi (deg), float64 arrays (N,); thickness (Angstrom) per frame
        or one value (None: the instrument's).
        """
        inst = self.instrument
        strain, om, ch = (np.asarray(a, dtype=np.float64) for a in (strain, omega_deg, chi_deg))
        n = len(strain)
        thickness = np.broadcast_to(
            np.asarray(
                inst.film_thickness_angstrom if thickness_angstrom is None else thickness_angstrom,
                dtype=np.float64,
            ),
            (n,),
        )
        # Annulus position: whole-pixel shift, sub-pixel phase, and its motion per degree.
        d = 1e-4
        u, v = annulus_centre_px(om, ch, inst)
        off_rows, off_cols = inst.beam_centre_offset_px
        u, v = u + off_cols, v + off_rows  # the ROI's centre is off the central ray
        u_w, v_w = annulus_centre_px(np.r_[om + d, om - d], np.r_[ch, ch], inst)
        u_c, v_c = annulus_centre_px(np.r_[om, om], np.r_[ch + d, ch - d], inst)
        cols = np.clip(np.round(u), -self.pad, self.pad)
        rows = np.clip(np.round(v), -self.pad, self.pad)
        p = self.phases
        pos_a = np.clip((u - cols + 0.5) * p, 0, p)
        pos_b = np.clip((v - rows + 0.5) * p, 0, p)
        ia, ib = np.minimum(np.floor(pos_a), p - 1), np.minimum(np.floor(pos_b), p - 1)
        # The tilted normal and its derivatives (per degree) against the detector's axes.
        geo = lab_geometry(inst)
        w = np.radians(om) + geo.theta_b
        c = np.radians(ch)
        cos_c, sin_c, cos_w, sin_w = np.cos(c), np.sin(c), np.cos(w), np.sin(w)
        axes = np.stack([geo.k_out0, geo.e_col, geo.e_row], 1)  # columns: k_out0, e_col, e_row
        normal = np.stack([sin_c, cos_c * cos_w, -cos_c * sin_w], 1) @ axes
        deg = math.pi / 180
        n_w = np.stack([np.zeros_like(c), -cos_c * sin_w, -cos_c * cos_w], 1) @ axes * deg
        n_c = np.stack([cos_c, -sin_c * cos_w, sin_c * sin_w], 1) @ axes * deg
        half_t = thickness / 2
        return FrameGeometry(
            rows=rows.astype(np.int64),
            cols=cols.astype(np.int64),
            corner=(ia * (p + 1) + ib).astype(np.int64),
            fa=pos_a - ia,
            fb=pos_b - ib,
            du_dw=(u_w[:n] - u_w[n:]) / (2 * d),
            dv_dw=(v_w[:n] - v_w[n:]) / (2 * d),
            du_dc=(u_c[:n] - u_c[n:]) / (2 * d),
            dv_dc=(v_c[:n] - v_c[n:]) / (2 * d),
            shift_u=(cols - off_cols) * self._pixel_over_r,
            shift_v=(rows - off_rows) * self._pixel_over_r,
            normal=normal,
            normal_d_omega=n_w,
            normal_d_chi=n_c,
            # 2k alpha - G(strain), G = 2 pi l / (c (1 + strain)): in float64, a difference of ~3.1.
            offset=self._two_k * normal[:, 0] - self._g0 / (1 + strain),
            half_t=half_t,
            dx_dstrain=half_t * self._g0 / (1 + strain) ** 2,
        )

    def evaluate(
        self,
        strain: torch.Tensor,
        omega_deg: torch.Tensor,
        chi_deg: torch.Tensor,
        scale: torch.Tensor,
        background: torch.Tensor,
        thickness_angstrom: torch.Tensor | float | None = None,
    ) -> ExpectedFrames:
        """Expected counts ``scale * intensity + background`` on the support, and derivatives.

        The readable reference of the per-pixel model (torch, float32); the physics check runs a
        fused kernel of the same arithmetic (``nanobeam_bluesky.quality``), tested against it.

        Args: float64 tensors (B,): strain (1), omega and chi (deg), scale (expected counts of a
        fully lit pixel at the Laue maximum), background (counts per binned pixel); thickness
        (Angstrom) per frame or one value (None: the instrument's).
        """
        g = self.geometry(
            strain.numpy(),
            omega_deg.numpy(),
            chi_deg.numpy(),
            None if thickness_angstrom is None else torch.as_tensor(thickness_angstrom).numpy(),
        )
        f32 = torch.float32

        def col(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=f32)[:, None]

        p = self.phases
        fa, fb = col(g.fa), col(g.fb)
        e00 = torch.as_tensor(g.corner)
        corners = (e00, e00 + (p + 1), e00 + 1, e00 + (p + 2))  # (a, b), (a+1, b), (a, b+1), (a+1, b+1)
        t00, t10, t01, t11 = (self._m0[c] for c in corners)
        lo = t00 + fa * (t10 - t00)
        hi = t01 + fa * (t11 - t01)
        m0 = lo + fb * (hi - lo)
        dm0_da = ((t10 - t00) + fb * ((t11 - t01) - (t10 - t00))) * p
        dm0_db = (hi - lo) * p
        mu = self._mu[corners[0]] + fa * (self._mu[corners[1]] - self._mu[corners[0]])
        mv = self._mv[corners[0]] + fb * (self._mv[corners[2]] - self._mv[corners[0]])

        # Momentum transfer at the pixel centres: offsets over R, and 1 - 1/|w| R to second order.
        alpha, beta, gamma = (col(g.normal[:, i]) for i in range(3))
        uu = self._u0[None] + col(g.shift_u)
        vv = self._v0[None] + col(g.shift_v)
        rho2 = uu * uu + vv * vv
        h = rho2 * (0.5 - 0.375 * rho2)  # 1 - 1/sqrt(1 + rho^2)
        lateral = uu * beta + vv * gamma
        q_minus_g = col(g.offset) + self._two_k * (lateral - h * (alpha + lateral))
        half_t = col(g.half_t)
        x = half_t * q_minus_g
        small = x.abs() < 1e-3
        safe = torch.where(small, torch.ones_like(x), x)
        sin_x = torch.sin(safe)
        sinc = torch.where(small, 1 - x * x / 6, sin_x / safe)
        dsinc = torch.where(small, -x / 3, (torch.cos(safe) - sinc) / safe)
        laue = sinc * sinc
        slope = 2 * sinc * dsinc  # d laue / d x
        k_px = self._two_k * self._pixel_over_r
        dq_du = k_px * (beta - alpha * uu)
        dq_dv = k_px * (gamma - alpha * vv)
        in_pixel = half_t * (dq_du * mu + dq_dv * mv)
        intensity = (laue * m0 + slope * in_pixel).clamp_(min=0)
        s32 = scale.to(f32)[:, None]
        mu_counts = s32 * intensity + background.to(f32)[:, None]

        # --- derivatives
        ds = s32 * slope * m0  # d mu / d x (leading term)
        d_strain = ds * col(g.dx_dstrain)
        d_thickness = ds * (x / (2 * half_t))

        def tilt(n_d: np.ndarray, du: np.ndarray, dv: np.ndarray) -> torch.Tensor:
            dq = self._two_k * (col(n_d[:, 0]) + uu * col(n_d[:, 1]) + vv * col(n_d[:, 2]))
            mask = dm0_da * col(du) + dm0_db * col(dv)
            return ds * half_t * dq + s32 * laue * mask

        d_omega = tilt(g.normal_d_omega, g.du_dw, g.dv_dw)
        d_chi = tilt(g.normal_d_chi, g.du_dc, g.dv_dc)
        rows, cols = torch.as_tensor(g.rows), torch.as_tensor(g.cols)
        shift = rows * (self.frame_pixels + 2 * self.pad) + cols
        index = self._base_index[None] + shift[:, None]
        r_abs = self._row_px[None] + rows[:, None]
        c_abs = self._col_px[None] + cols[:, None]
        f = self.frame_pixels
        inside = (r_abs >= 0) & (r_abs < f) & (c_abs >= 0) & (c_abs < f)
        return ExpectedFrames(mu_counts, intensity, d_strain, d_omega, d_chi, d_thickness, index, inside)

    def render(
        self, strain, omega_deg, chi_deg, *, scale=1.0, background=0.0, thickness_angstrom=None
    ) -> np.ndarray:
        """Full expected-count frames (N, F, F), float32: for tests and pictures, not speed."""
        strain, omega, chi = (
            torch.as_tensor(np.atleast_1d(np.asarray(v, dtype=np.float64)))
            for v in (strain, omega_deg, chi_deg)
        )
        n = max(len(strain), len(omega), len(chi))
        strain, omega, chi = (t.expand(n).contiguous() for t in (strain, omega, chi))
        s = torch.as_tensor(scale, dtype=torch.float64).expand(n)
        b = torch.as_tensor(background, dtype=torch.float64).expand(n)
        ev = self.evaluate(strain, omega, chi, s, b, thickness_angstrom)
        f, p = self.frame_pixels, self.pad
        out = torch.zeros(n, (f + 2 * p) ** 2) + b.float()[:, None]
        out.scatter_(1, ev.index, ev.mu)
        return out.reshape(n, f + 2 * p, f + 2 * p)[:, p : p + f, p : p + f].numpy()


@functools.lru_cache(maxsize=8)
def _shared_model(instrument: Instrument) -> FrameModel:
    return FrameModel(instrument)
