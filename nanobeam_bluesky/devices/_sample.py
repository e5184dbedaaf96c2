"""The sample under the nanobeam and the frames it diffracts into the detector."""

from __future__ import annotations

from collections import OrderedDict
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
        cache_frames: keep up to this many noise-free frames, keyed by the sample's exact values
            there (a pixelated phantom repeats them), so that a fly scan at kHz rates costs a
            Poisson draw per frame; :meth:`prepare` fills it for a scan's path in one batch.
    """

    sample: Sample
    instrument: Instrument = field(default_factory=Instrument)
    count_rate_per_s: float = 700.0
    frame: Literal["binned", "raw"] = "binned"
    upsample: int | None = None
    seed: int | None = None
    cache_frames: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sample, Sample):
            raise TypeError(f"sample needs a values_at(x_um, y_um) method, got {type(self.sample).__name__}")
        if self.frame not in ("binned", "raw"):
            raise InputError(f"frame must be 'binned' or 'raw', got {self.frame!r}")
        if not self.count_rate_per_s > 0:
            raise InputError(f"count_rate_per_s must be positive, got {self.count_rate_per_s!r}")
        self._rng = np.random.default_rng(self.seed)
        # (strain, omega, chi) bytes -> noise-free frame at exposure 1 s, float32 (H, W).
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @property
    def frame_shape(self) -> tuple[int, int]:
        n = self.instrument.frame_pixels if self.frame == "binned" else self.instrument.roi_pixels
        return n, n

    def expected_counts(self, x_um, y_um, exposure_s: float) -> np.ndarray:
        """Noise-free expected counts (N, H, W) at the positions, float32."""
        strain, omega, chi = (np.atleast_1d(v) for v in self.sample.values_at(x_um, y_um))
        if self.cache_frames <= 0:
            return self._expected(strain, omega, chi, exposure_s)
        values = np.stack(np.broadcast_arrays(strain, omega, chi), axis=-1).astype(np.float64)
        keys = [row.tobytes() for row in values]
        new = [key for key in dict.fromkeys(keys) if key not in self._cache]
        if new:
            v = np.array([np.frombuffer(key, dtype=np.float64) for key in new])
            for key, frame in zip(new, self._expected(v[:, 0], v[:, 1], v[:, 2], 1.0), strict=True):
                self._cache[key] = frame
        out = np.empty((len(keys), *self.frame_shape), dtype=np.float32)
        for i, key in enumerate(keys):
            self._cache.move_to_end(key)
            out[i] = self._cache[key]
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)
        return out * np.float32(exposure_s)

    def prepare(self, x_um, y_um) -> None:
        """Simulate the noise-free frames of these positions now, in one batch (needs
        ``cache_frames``): a scan along them then only draws the noise."""
        if self.cache_frames <= 0:
            raise InputError("prepare() needs FrameSimulator(cache_frames=N), N > 0")
        self.expected_counts(x_um, y_um, 1.0)

    def _expected(self, strain, omega, chi, exposure_s: float) -> np.ndarray:
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
