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
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .mlp import normalise_counts

__all__ = ["RegisteredMLP", "TiltRegistration", "register_frames"]


@dataclass(frozen=True)
class TiltRegistration:
    """Whole-pixel shifts of the annulus from tilts, and back.

    Attributes:
        pixels_per_deg_omega: column shift of the annulus per degree of omega (binned pixels).
        pixels_per_deg_chi: row shift of the annulus per degree of chi (binned pixels).
        max_shift: shifts are clipped to +-max_shift pixels (frames are zero-padded by that).
    """

    pixels_per_deg_omega: float
    pixels_per_deg_chi: float
    max_shift: int = 16

    @classmethod
    def for_instrument(cls, instrument) -> TiltRegistration:
        """physics.md's annulus shifts for ``instrument`` (a physics ``Instrument``)."""
        per_deg = 2 * instrument.detector_distance_m / instrument.binned_pixel_m * math.pi / 180
        per_deg_chi = per_deg * math.sin(instrument.bragg_angle_rad)
        ranges = instrument.parameter_ranges
        largest = max(max(map(abs, ranges["omega"])) * per_deg, max(map(abs, ranges["chi"])) * per_deg_chi)
        return cls(per_deg, per_deg_chi, math.ceil(largest) + 2)

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

    def to_dict(self) -> dict[str, float]:
        return {
            "pixels_per_deg_omega": self.pixels_per_deg_omega,
            "pixels_per_deg_chi": self.pixels_per_deg_chi,
            "max_shift": self.max_shift,
        }


def register_frames(frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pad: int) -> torch.Tensor:
    """out[n, i, j] = frames[n, i + rows[n], j + cols[n]], zero outside the frame. Shape (N, F, F)."""
    n, f = frames.shape[0], frames.shape[-1]
    padded = nn.functional.pad(frames, (pad, pad, pad, pad))
    i = torch.arange(f, device=frames.device)
    r = (i[None, :] + pad + rows[:, None]).reshape(n, f, 1)
    c = (i[None, :] + pad + cols[:, None]).reshape(n, 1, f)
    return padded[torch.arange(n, device=frames.device)[:, None, None], r, c]


class RegisteredMLP(nn.Module):
    """(counts (N, F, F), rows, cols) -> (N, 2) standardised residual (omega, chi).

    The frame is registered by the whole-pixel shifts, count-normalised as in
    :class:`~nanobeam_bluesky.models.NanobeamMLP`, and the two shifts (over ``max_shift``) are
    appended: they say which border strips are padding.
    """

    n_outputs = 2

    def __init__(
        self, frame_pixels: int = 64, hidden: tuple[int, ...] = (256, 256), max_shift: int = 16
    ) -> None:
        super().__init__()
        sizes = (frame_pixels * frame_pixels + 2, *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], self.n_outputs))
        self.layers = nn.Sequential(*layers)
        self.frame_pixels = frame_pixels
        self.max_shift = max_shift

    def features(self, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The network's input (N, F*F + 2)."""
        f = self.frame_pixels
        registered = register_frames(frames.reshape(-1, f, f), rows, cols, self.max_shift)
        shifts = torch.stack([rows, cols], 1).to(registered.dtype) / self.max_shift
        return torch.cat([normalise_counts(registered).flatten(1), shifts], 1)

    def forward(self, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.layers(self.features(frames, rows, cols))
