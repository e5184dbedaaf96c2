"""Our architecture: a count-normalised multilayer perceptron over the whole frame.

Why not convolutions: on a CPU, PyTorch's small-channel 2-D convolutions run far below the
machine's matrix-multiply speed, while a dense first layer over 4096 pixels is one GEMM. The
tilts are positions of the annulus edges, which a dense layer sees with sub-pixel precision
(no pooling), and the strain is the position of the Laue band inside it. Each frame is divided
by its mean count, so a change of beam current changes the noise but not the input's scale;
a square root then makes the Poisson noise nearly uniform across pixels.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["NanobeamMLP", "normalise_counts"]


def normalise_counts(frames: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """sqrt(frame / mean(frame)) per frame: independent of the count level. Shape (N, H, W)."""
    mean = frames.mean(dim=(-2, -1), keepdim=True)
    return torch.sqrt(torch.clamp(frames, min=0) / (mean + eps))


def register_frames(frames: torch.Tensor, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each frame by whole pixels so its intensity centroid sits at the frame centre.

    Whole-pixel shifts lose nothing (pixels that leave the window were zero or are few), so the
    network sees the donut at one place and learns only what moves it by less than a pixel; the
    shift itself is returned (in pixels, (N, 2): rows, cols) as an input of its own.
    """
    n, h, w = frames.shape
    weight = frames.clamp(min=0)
    total = weight.sum(dim=(1, 2)).clamp(min=1e-6)
    rows = torch.arange(h, dtype=frames.dtype, device=frames.device)
    cols = torch.arange(w, dtype=frames.dtype, device=frames.device)
    centre_r = (weight.sum(2) * rows).sum(1) / total
    centre_c = (weight.sum(1) * cols).sum(1) / total
    shift = torch.stack([centre_r - (h - 1) / 2, centre_c - (w - 1) / 2], 1)
    shift = shift.round().clamp(-max_shift, max_shift)
    padded = nn.functional.pad(frames, (max_shift, max_shift, max_shift, max_shift))
    r_idx = (rows.long()[None, :] + max_shift + shift[:, :1].long())  # (N, h)
    c_idx = (cols.long()[None, :] + max_shift + shift[:, 1:].long())  # (N, w)
    out = torch.gather(padded, 1, r_idx[:, :, None].expand(n, h, padded.shape[2]))
    out = torch.gather(out, 2, c_idx[:, None, :].expand(n, h, w))
    return out, shift


class NanobeamMLP(nn.Module):
    """Frame (N, 1, H, W) or (N, H, W) in counts -> (N, 3) standardised (strain, omega, chi).

    ``register=True`` first centres each frame on its intensity centroid by whole pixels
    (:func:`register_frames`) and gives the network the shift as two extra inputs.
    """

    def __init__(self, frame_pixels: int = 64, hidden: tuple[int, ...] = (256, 256),
                 register: bool = False, max_shift: int = 16) -> None:
        super().__init__()
        self.register = register
        self.max_shift = max_shift
        sizes = (frame_pixels * frame_pixels + (2 if register else 0), *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 3))
        self.layers = nn.Sequential(*layers)
        self.frame_pixels = frame_pixels

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.layers(self.features(frames))

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """The first layer's input: normalised (and, if registered, centred) pixels."""
        frames = frames.reshape(frames.shape[0], self.frame_pixels, self.frame_pixels)
        x = normalise_counts(frames)
        if not self.register:
            return x.flatten(1)
        x, shift = register_frames(x, self.max_shift)
        return torch.cat([x.flatten(1), shift / self.max_shift], 1)
