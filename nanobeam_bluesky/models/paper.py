"""The published NanobeamNN architecture (Luo et al., Sci. Rep. 2025)."""

from __future__ import annotations

from torch import nn

__all__ = ["PaperCNN"]


class PaperCNN(nn.Sequential):
    """Six unpadded 3x3 convolutions 1->2->4->8->16->32->64 with ReLU, a 2x2 max-pool after every
    second one, then Linear(1024 -> 3). 27,771 parameters for 64 x 64 frames.

    Input (N, 1, 64, 64); output (N, 3) standardised (strain, omega, chi).
    """

    def __init__(self) -> None:
        channels = (1, 2, 4, 8, 16, 32, 64)
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(channels[i], channels[i + 1], kernel_size=3), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        super().__init__(*layers, nn.Flatten(), nn.Linear(1024, 3))
