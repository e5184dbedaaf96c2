"""The sample stage: two ophyd-async SimMotors (µm) and a raster trajectory with trigger output."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
from bluesky.protocols import Flyable, Preparable, Reading
from ophyd_async.core import AsyncStatus, StandardReadable
from ophyd_async.sim import SimMotor

from ..errors import InputError

__all__ = ["NanoprobeStage", "RasterInfo", "RasterPath", "TriggerOutput", "TriggerPulse"]


#: Above 1 / MOTOR_UPDATE_S points per second a raster moves the motors only every MOTOR_UPDATE_S (s).
MOTOR_UPDATE_S = 0.005


@dataclass(frozen=True, eq=False)
class RasterPath:
    """The stage positions of a raster scan, in acquisition order.

    Attributes:
        x_um, y_um: stage position of each frame, µm.
        shape: (ny, nx) of the map.
        extents: ((y_first, y_last), (x_first, x_last)), µm, slow axis first as in bluesky.
        snake: whether every other line runs backwards.
    """

    x_um: np.ndarray
    y_um: np.ndarray
    shape: tuple[int, int]
    extents: tuple[tuple[float, float], tuple[float, float]]
    snake: bool = False

    @classmethod
    def grid(
        cls,
        x_start: float,
        x_stop: float,
        nx: int,
        y_start: float,
        y_stop: float,
        ny: int,
        *,
        snake: bool = False,
    ) -> RasterPath:
        """ny lines along x from (x_start, y_start) to (x_stop, y_stop), both ends included, µm."""
        if nx < 1 or ny < 1:
            raise InputError(f"nx and ny must be >= 1, got {nx}, {ny}")
        xs = np.linspace(x_start, x_stop, nx)
        ys = np.linspace(y_start, y_stop, ny)
        x = np.tile(xs, (ny, 1))
        if snake:
            x[1::2] = x[1::2, ::-1]
        y = np.repeat(ys, nx)
        return cls(
            x.ravel(), y, (ny, nx), ((float(y_start), float(y_stop)), (float(x_start), float(x_stop))), snake
        )

    def __len__(self) -> int:
        return len(self.x_um)


@dataclass(frozen=True)
class RasterInfo:
    """What :meth:`NanoprobeStage.prepare` needs: the path and the time per point (s)."""

    path: RasterPath
    period_s: float

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise InputError(f"period_s must be positive, got {self.period_s!r}")


@dataclass(frozen=True)
class TriggerPulse:
    """One position-compare trigger: frame index and the encoder positions (µm) at the edge."""

    index: int
    x_um: float
    y_um: float
    time: float


class TriggerOutput:
    """The stage controller's trigger output; detectors connect an input queue to it."""

    def __init__(self) -> None:
        self._inputs: list[asyncio.Queue[TriggerPulse]] = []

    def connect(self) -> asyncio.Queue[TriggerPulse]:
        queue: asyncio.Queue[TriggerPulse] = asyncio.Queue()
        self._inputs.append(queue)
        return queue

    def disconnect(self, queue: asyncio.Queue[TriggerPulse]) -> None:
        if queue in self._inputs:
            self._inputs.remove(queue)

    def fire(self, pulse: TriggerPulse) -> None:
        for queue in list(self._inputs):
            queue.put_nowait(pulse)


class NanoprobeStage(StandardReadable, Preparable, Flyable):
    """Sample stage with ``x`` and ``y`` SimMotors in µm (instant moves unless given a velocity).

    Step scans move ``stage.x``/``stage.y`` like any motor. Fly scans ``prepare`` it with a
    :class:`RasterInfo`, ``kickoff`` it, and it visits every point of the path, one per
    ``period_s``, firing a :class:`TriggerPulse` with the encoder positions at each point on
    :attr:`trigger_output` (wired to the detector's trigger input).
    """

    def __init__(self, name: str = "") -> None:
        with self.add_children_as_readables():
            self.x = SimMotor(units="um")
            self.y = SimMotor(units="um")
        self.trigger_output = TriggerOutput()
        self._info: RasterInfo | None = None
        self._raster: asyncio.Task | None = None
        self._position = [math.nan, math.nan]
        self._followers = 0
        super().__init__(name=name)

    # ---------------------------------------------------------------- position for sync readers
    def _on_x(self, reading: dict[str, Reading[float]]) -> None:
        (value,) = reading.values()
        self._position[0] = float(value["value"])

    def _on_y(self, reading: dict[str, Reading[float]]) -> None:
        (value,) = reading.values()
        self._position[1] = float(value["value"])

    def follow(self) -> None:
        """Start caching the readbacks for :meth:`position_um` (needs the running event loop)."""
        if self._followers == 0:
            self.x.user_readback.subscribe_reading(self._on_x)
            self.y.user_readback.subscribe_reading(self._on_y)
        self._followers += 1

    def unfollow(self) -> None:
        self._followers = max(0, self._followers - 1)
        if self._followers == 0:
            self.x.user_readback.clear_sub(self._on_x)
            self.y.user_readback.clear_sub(self._on_y)

    def position_um(self) -> tuple[float, float]:
        """Last (x, y) readback in µm, for synchronous (classic ophyd) readers; see :meth:`follow`."""
        if self._followers == 0:
            raise RuntimeError(
                f"{self.name}: call follow() (e.g. in the detector's stage()) before position_um()"
            )
        return self._position[0], self._position[1]

    async def read_position_um(self) -> tuple[float, float]:
        x, y = await asyncio.gather(self.x.user_readback.get_value(), self.y.user_readback.get_value())
        return float(x), float(y)

    # ---------------------------------------------------------------- raster fly scan
    @AsyncStatus.wrap
    async def prepare(self, value: RasterInfo) -> None:
        """Move to the first point of the path and remember it for kickoff."""
        if not isinstance(value, RasterInfo):
            raise TypeError(f"prepare the stage with a RasterInfo, got {type(value).__name__}")
        self._info = value
        await asyncio.gather(self.x.set(float(value.path.x_um[0])), self.y.set(float(value.path.y_um[0])))

    @AsyncStatus.wrap
    async def kickoff(self) -> None:
        if self._info is None:
            raise RuntimeError(f"{self.name}: prepare(RasterInfo(...)) before kickoff")
        self._raster = asyncio.create_task(self._run_raster(self._info))

    async def _run_raster(self, info: RasterInfo) -> None:
        start = time.monotonic()
        # A move per point costs ~1 ms here: above ~200 points/s the motors are moved every
        # MOTOR_UPDATE_S instead and each pulse carries the path's position (what an encoder
        # latched at the trigger would read on an ideal trajectory).
        every = max(1, round(MOTOR_UPDATE_S / info.period_s)) if info.period_s < MOTOR_UPDATE_S else 1
        for i, (x, y) in enumerate(zip(info.path.x_um.tolist(), info.path.y_um.tolist(), strict=True)):
            if i % every == 0:
                await asyncio.gather(self.x.set(x), self.y.set(y))
            if every == 1:
                x, y = await self.read_position_um()
            self.trigger_output.fire(TriggerPulse(i, x, y, time.time()))
            await asyncio.sleep(max(0.0, start + (i + 1) * info.period_s - time.monotonic()))

    @AsyncStatus.wrap
    async def complete(self) -> None:
        if self._raster is None:
            raise RuntimeError(f"{self.name}: kickoff before complete")
        try:
            await self._raster
        finally:
            self._raster = None

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        if self._raster is not None:
            self._raster.cancel()
            self._raster = None
        await super().unstage()
