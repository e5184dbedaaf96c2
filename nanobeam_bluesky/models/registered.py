"""The refining stage: a dense network on frames registered to a coarse tilt estimate.

Why: the tilts are the position of the annulus, which moves by up to 13.5 binned pixels in
omega and 7.4 in chi over the parameter box, while the Cramer-Rao bound is 0.03 pixel. One dense
network over the whole box has to place its edge filters for every position at once and stays at
2-3x the bound however long it trains. Shifted by whole pixels so that the annulus sits at the
centre (no interpolation: the counts and their Poisson statistics stay untouched), every frame
looks alike up to a sub-pixel residual, and the same network reaches about 1.2x the bound
within a few epochs.

The shift in pixels per degree comes from physics.md: omega moves the annulus along columns by
2 omega R / delta, chi along rows by about 2 sin(theta_B) chi R / delta.

Strain does not move the annulus: it moves the bright band inside it, along columns by
-tan(theta_B) epsilon R / delta, and omega carries the band at half the annulus's rate. A frame
registered on the annulus still shows the band anywhere over +-15 pixels, the problem the coarse
network has; so a strain-refining network also sees a second copy of the frame, shifted by whole
pixels so that the band sits at the centre, and predicts the band's sub-pixel rest.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .mlp import normalise_counts

__all__ = ["RegisteredMLP", "TiltRegistration", "register_frames"]


@dataclass(frozen=True)
class TiltRegistration:
    """Whole-pixel shifts of the annulus from tilts, and back.

    Attributes:
        pixels_per_deg_omega: column shift of the annulus per degree of omega (binned pixels).
        pixels_per_deg_chi: row shift of the annulus per degree of chi (binned pixels).
        max_shift: shifts are clipped to +-max_shift pixels (frames are zero-padded by that).
        pixels_per_strain: column shift of the band per unit strain (binned pixels, the band
            moves to lower columns as strain rises); 0: the tilts alone are refined.
        band_max_shift: band shifts are clipped to +-band_max_shift pixels.
    """

    pixels_per_deg_omega: float
    pixels_per_deg_chi: float
    max_shift: int = 16
    pixels_per_strain: float = 0.0
    band_max_shift: int = 0

    @classmethod
    def for_instrument(cls, instrument, *, refine_strain: bool = False) -> TiltRegistration:
        """physics.md's annulus (and, with ``refine_strain``, band) shifts for ``instrument``."""
        pixels_per_rad = instrument.detector_distance_m / instrument.binned_pixel_m
        per_deg = 2 * pixels_per_rad * math.pi / 180
        per_deg_chi = per_deg * math.sin(instrument.bragg_angle_rad)
        ranges = instrument.parameter_ranges
        omega, chi = max(map(abs, ranges["omega"])), max(map(abs, ranges["chi"]))
        largest = max(omega * per_deg, chi * per_deg_chi)
        if not refine_strain:
            return cls(per_deg, per_deg_chi, math.ceil(largest) + 2)
        per_strain = math.tan(instrument.bragg_angle_rad) * pixels_per_rad
        band = max(map(abs, ranges["strain"])) * per_strain + omega * per_deg / 2
        return cls(per_deg, per_deg_chi, math.ceil(largest) + 2, per_strain, math.ceil(band) + 2)

    @property
    def refines_strain(self) -> bool:
        return self.pixels_per_strain > 0

    def band_position(self, strain: torch.Tensor, omega_deg: torch.Tensor) -> torch.Tensor:
        """Column offset (binned pixels) of the band from its place at zero strain and tilt."""
        return omega_deg * (self.pixels_per_deg_omega / 2) - strain * self.pixels_per_strain

    def band_shifts(self, strain: torch.Tensor, omega_deg: torch.Tensor) -> torch.Tensor:
        """Whole-pixel column shifts (int64) that centre the band of these parameters."""
        band = torch.round(self.band_position(strain, omega_deg))
        return band.clamp(-self.band_max_shift, self.band_max_shift).long()

    def strain(self, band_px: torch.Tensor, omega_deg: torch.Tensor) -> torch.Tensor:
        """The strain whose band is at ``band_px`` (binned pixels) at tilt ``omega_deg``."""
        return (omega_deg * (self.pixels_per_deg_omega / 2) - band_px) / self.pixels_per_strain

    @property
    def residual_half_range_deg(self) -> tuple[float, float]:
        """(omega, chi) in degrees that one pixel of shift is: the refiner's output scale."""
        return 1 / self.pixels_per_deg_omega, 1 / self.pixels_per_deg_chi

    def shifts(self, omega_deg: torch.Tensor, chi_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-pixel (row, column) shifts (int64) that centre an annulus at these tilts."""
        rows = torch.round(chi_deg * self.pixels_per_deg_chi).clamp(-self.max_shift, self.max_shift)
        cols = torch.round(omega_deg * self.pixels_per_deg_omega).clamp(-self.max_shift, self.max_shift)
        return rows.long(), cols.long()

    def tilts(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(omega_deg, chi_deg) of whole-pixel shifts (float64): the inverse of :meth:`shifts`."""
        return cols.double() / self.pixels_per_deg_omega, rows.double() / self.pixels_per_deg_chi

    def whole_pixel(self, coarse: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Shifts for a coarse (strain, omega deg, chi deg) estimate (N, 3): (rows, cols, band
        columns or None when strain is not refined, base (N, 2 or 3)); ``base`` is what the
        whole-pixel shifts alone say, (omega, chi[, band pixels]) (float64)."""
        rows, cols = self.shifts(coarse[:, 1], coarse[:, 2])
        base = torch.stack(self.tilts(rows, cols), 1)
        if not self.refines_strain:
            return rows, cols, None, base
        band_cols = self.band_shifts(coarse[:, 0], coarse[:, 1])
        return rows, cols, band_cols, torch.cat([base, band_cols[:, None].double()], 1)

    def physical(self, values: torch.Tensor) -> torch.Tensor:
        """(..., 2 or 3) refined (omega, chi[, band pixels]) -> (omega, chi[, strain]) (float64)."""
        if not self.refines_strain:
            return values
        strain = self.strain(values[..., 2], values[..., 0])
        return torch.cat([values[..., :2], strain[..., None]], -1)

    @property
    def output_scale(self) -> tuple[float, ...]:
        """Units of the refiner's outputs: (omega deg, chi deg[, band pixels]) per output unit."""
        return (*self.residual_half_range_deg, *((1.0,) if self.refines_strain else ()))

    def to_dict(self) -> dict[str, float]:
        out = {
            "pixels_per_deg_omega": self.pixels_per_deg_omega,
            "pixels_per_deg_chi": self.pixels_per_deg_chi,
            "max_shift": self.max_shift,
        }
        if self.refines_strain:  # files that refine the tilts alone keep their three keys
            out |= {"pixels_per_strain": self.pixels_per_strain, "band_max_shift": self.band_max_shift}
        return out


def register_frames(frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pad: int) -> torch.Tensor:
    """out[n, i, j] = frames[n, i + rows[n], j + cols[n]], zero outside the frame. Shape (N, F, F)."""
    n, f = frames.shape[0], frames.shape[-1]
    padded = nn.functional.pad(frames, (pad, pad, pad, pad))
    i = torch.arange(f, device=frames.device)
    r = (i[None, :] + pad + rows[:, None]).reshape(n, f, 1)
    c = (i[None, :] + pad + cols[:, None]).reshape(n, 1, f)
    return padded[torch.arange(n, device=frames.device)[:, None, None], r, c]


class RegisteredMLP(nn.Module):
    """(counts (N, F, F), rows, cols[, band_cols]) -> (N, 2 or 3) residual (omega, chi[, band]).

    The frame is registered by the whole-pixel shifts, count-normalised as in
    :class:`~nanobeam_bluesky.models.NanobeamMLP`, and the two shifts (over ``max_shift``) are
    appended: they say which border strips are padding. With ``band_max_shift`` > 0 the network
    also refines strain: a second copy of the frame, registered on the band (rows as the first,
    columns by ``band_cols``), and that shift are appended, and a third output is the band's
    residual in pixels.
    """

    def __init__(
        self,
        frame_pixels: int = 64,
        hidden: tuple[int, ...] = (256, 256),
        max_shift: int = 16,
        band_max_shift: int = 0,
    ) -> None:
        super().__init__()
        self.n_outputs = 3 if band_max_shift else 2
        pixels = frame_pixels * frame_pixels
        sizes = (pixels + 2 + (pixels + 1 if band_max_shift else 0), *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], self.n_outputs))
        self.layers = nn.Sequential(*layers)
        self.frame_pixels = frame_pixels
        self.max_shift = max_shift
        self.band_max_shift = band_max_shift

    def features(
        self,
        frames: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        band_cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's input (N, F*F + 2), or (N, 2 F*F + 3) when it refines strain."""
        f = self.frame_pixels
        frames = frames.reshape(-1, f, f)
        registered = register_frames(frames, rows, cols, self.max_shift)
        shifts = torch.stack([rows, cols], 1).to(registered.dtype) / self.max_shift
        parts = [normalise_counts(registered).flatten(1), shifts]
        if self.band_max_shift:
            if band_cols is None:
                raise ValueError("this network refines strain: pass the band's column shifts")
            pad = max(self.max_shift, self.band_max_shift)
            band = register_frames(frames, rows, band_cols, pad)
            parts += [
                normalise_counts(band).flatten(1),
                band_cols[:, None].to(band.dtype) / self.band_max_shift,
            ]
        return torch.cat(parts, 1)

    def forward(self, frames: Tensor, rows: Tensor, cols: Tensor, band_cols: Tensor | None = None) -> Tensor:
        return self.layers(self.features(frames, rows, cols, band_cols))
