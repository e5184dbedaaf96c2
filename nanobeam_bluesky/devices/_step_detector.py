"""A classic ophyd area detector for step scans: ``bp.grid_scan`` puts its frames in the events."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Kind, Signal

from ._sample import FrameSimulator
from ._stage import NanoprobeStage

__all__ = ["NanoprobeStepDetector"]


class _FrameSignal(Signal):
    """An image signal that declares its shape and numpy dtype (so stores keep the counts' type)."""

    frame_shape: tuple[int, int] = (64, 64)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name].update(
            dtype="array", shape=list(self.frame_shape), dtype_numpy=np.dtype(np.uint32).str, units="counts"
        )
        return desc


class NanoprobeStepDetector(Device):
    """Simulated diffraction detector for step scans (a classic ophyd Device).

    On ``trigger()`` it reads the stage position, exposes for ``exposure_time`` seconds and puts
    the frame (uint32 Poisson counts, 64 x 64 binned or 128 x 128 raw) into ``image``; the status
    finishes after the exposure plus ``dead_time`` (readout), as a real camera's would.

    Data keys: ``<name>_image`` (the frame), ``<name>_total_counts`` (hinted, its sum).
    Configuration: ``exposure_time`` (s, default 0.01), ``dead_time`` (s, default 0.002).
    """

    image = Cpt(_FrameSignal, value=np.zeros((64, 64), np.uint32), kind=Kind.normal)
    total_counts = Cpt(Signal, value=0, kind=Kind.hinted)
    exposure_time = Cpt(Signal, value=0.01, kind=Kind.config)
    dead_time = Cpt(Signal, value=0.002, kind=Kind.config)

    def __init__(self, simulator: FrameSimulator, stage: NanoprobeStage, *, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.simulator = simulator
        self.sample_stage = stage
        self.image.frame_shape = simulator.frame_shape
        self.image.put(np.zeros(simulator.frame_shape, np.uint32))

    def stage(self) -> list[Any]:
        self.sample_stage.follow()
        return super().stage()

    def unstage(self) -> list[Any]:
        self.sample_stage.unfollow()
        return super().unstage()

    def trigger(self) -> DeviceStatus:
        x_um, y_um = self.sample_stage.position_um()
        exposure, dead = float(self.exposure_time.get()), float(self.dead_time.get())
        status = DeviceStatus(self)
        started = time.monotonic()

        def expose() -> None:
            try:
                frame = self.simulator.frames_at(x_um, y_um, exposure)[0]
                time.sleep(max(0.0, started + exposure + dead - time.monotonic()))
                self.image.put(frame)
                self.total_counts.put(int(frame.sum()))
            except Exception as exc:
                status.set_exception(exc)
            else:
                status.set_finished()

        threading.Thread(target=expose, name=f"{self.name}-exposure", daemon=True).start()
        return status
