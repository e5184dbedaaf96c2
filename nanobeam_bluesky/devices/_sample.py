"""The sample under the nanobeam and the frames it diffracts into the detector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError
from ..physics import Instrument, simulate, simulate_roi

__all__ = ["FrameSimulator", "Sample"]


@runtime_checkable
class Sample(Protocol):
    """Anything that gives (strain, omega_deg, chi_deg) at stage positions in µm.

    ``nanobeam_bluesky.phantoms.Phantom`` is one.
    """

    def values_at(self, x_um, y_um) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class FrameSimulator:
    """Simulates what the detector records when the beam sits at a stage position.

    Counts follow the library-wide convention of physics.md: a fully lit pixel at the Laue
    maximum expects ``count_rate_per_s * exposure_s`` counts (700 /s x 10 ms = 7, the training
    level), then Poisson noise.

    Attributes:
        sample: the sample (:class:`Sample`), positions in µm.
        instrument: the nanoprobe (default: physics.md's table).
        count_rate_per_s: expected counts per second of a fully lit pixel at the Laue maximum.
        frame: "binned" 64 x 64 frames, or "raw" 128 x 128 ROIs (counts per 55 µm pixel).
        upsample: simulator sub-pixels per binned pixel (None: the instrument's, 8; about 1,500
            frames/s on 2 cores, as the models were trained; 4 is 2x faster and 1.4 % coarser).
        seed: seed of the Poisson noise.
    """

    sample: Sample
    instrument: Instrument = field(default_factory=Instrument)
    count_rate_per_s: float = 700.0
    frame: Literal["binned", "raw"] = "binned"
    upsample: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sample, Sample):
            raise TypeError(f"sample needs a values_at(x_um, y_um) method, got {type(self.sample).__name__}")
        if self.frame not in ("binned", "raw"):
            raise InputError(f"frame must be 'binned' or 'raw', got {self.frame!r}")
        if not self.count_rate_per_s > 0:
            raise InputError(f"count_rate_per_s must be positive, got {self.count_rate_per_s!r}")
        self._rng = np.random.default_rng(self.seed)

    @property
    def frame_shape(self) -> tuple[int, int]:
        n = self.instrument.frame_pixels if self.frame == "binned" else self.instrument.roi_pixels
        return n, n

    def expected_counts(self, x_um, y_um, exposure_s: float) -> np.ndarray:
        """Noise-free expected counts (N, H, W) at the positions, float32."""
        strain, omega, chi = (np.atleast_1d(v) for v in self.sample.values_at(x_um, y_um))
        if self.frame == "binned":
            intensity = simulate(strain, omega, chi, self.instrument, upsample=self.upsample)
            per_pixel = 1.0
        else:
            intensity = simulate_roi(strain, omega, chi, self.instrument, upsample=self.upsample)
            # A raw pixel holds the mean over its area; binning sums binning**2 of them.
            per_pixel = 1.0 / self.instrument.binning**2
        return intensity * np.float32(self.count_rate_per_s * exposure_s * per_pixel)

    def frames_at(self, x_um, y_um, exposure_s: float) -> np.ndarray:
        """Poisson counts (N, H, W) as uint32 for an exposure of ``exposure_s`` seconds."""
        if not exposure_s > 0:
            raise InputError(f"exposure_s must be positive, got {exposure_s!r}")
        return self._rng.poisson(self.expected_counts(x_um, y_um, exposure_s)).astype(np.uint32)
