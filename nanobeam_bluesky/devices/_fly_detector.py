"""An ophyd-async StandardDetector for fly scans, built like ``ophyd_async.sim.SimBlobDetector``.

Three logic objects around a simulated camera driver:

- :class:`NanoprobeTriggerLogic` sets exposure/dead time for internal triggering, or exposure
  for external edges (the stage's position-compare pulses);
- :class:`NanoprobeAcquireLogic` runs the driver's acquisition as a background task;
- :class:`NanoprobeDataLogic` opens the HDF5 file (SWMR) and describes it with StreamResources:
  the frames, and the x/y encoder positions captured with every frame.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from event_model import DataKey
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    Device,
    PathProvider,
    Reference,
    SignalDict,
    SignalR,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    UUIDFilenameProvider,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from ..errors import InputError
from ._sample import FrameSimulator
from ._stage import NanoprobeStage, TriggerPulse

__all__ = [
    "DATA_PATH",
    "TIME_PATH",
    "X_PATH",
    "Y_PATH",
    "NanoprobeAcquireLogic",
    "NanoprobeDataLogic",
    "NanoprobeDriver",
    "NanoprobeFlyDetector",
    "NanoprobeTriggerLogic",
]

DATA_PATH = "/entry/data/data"
X_PATH = "/entry/instrument/positions/x_um"
Y_PATH = "/entry/instrument/positions/y_um"
#: When each frame's exposure began (s since the epoch), as areaDetector's NDArray timestamps.
TIME_PATH = "/entry/instrument/timestamps/time_s"
#: Shortest time between frames the simulated camera supports (readout), s.
MIN_DEAD_TIME_S = 0.0005


class _FrameFile:
    """Frames and positions appended to an HDF5 file that SWMR readers follow."""

    def __init__(self, path: Path, frame_shape: tuple[int, int]) -> None:
        self.file = h5py.File(path, "w", libver="latest")
        self.data = self.file.create_dataset(
            DATA_PATH,
            shape=(0, *frame_shape),
            dtype=np.uint32,
            maxshape=(None, *frame_shape),
            chunks=(1, *frame_shape),
        )
        self.x, self.y = (
            self.file.create_dataset(path, shape=(0,), dtype=np.float64, maxshape=(None,), chunks=(1024,))
            for path in (X_PATH, Y_PATH)
        )
        self.x.attrs["units"] = self.y.attrs["units"] = "um"
        self.time = self.file.create_dataset(
            TIME_PATH, shape=(0,), dtype=np.float64, maxshape=(None,), chunks=(1024,)
        )
        self.time.attrs["units"] = "s"
        self.file.swmr_mode = True
        self.frames = 0

    def append(self, frame: np.ndarray, x_um: float, y_um: float, time_s: float) -> None:
        i = self.frames
        for dset, value in ((self.time, time_s), (self.x, x_um), (self.y, y_um), (self.data, frame)):
            dset.resize(i + 1, axis=0)
            dset[i] = value
            dset.flush()
        self.frames = i + 1

    def close(self) -> None:
        self.file.close()


class NanoprobeDriver(Device):
    """The simulated camera: exposure settings, the open file and the acquisition loop.

    Signals: ``exposure_time`` and ``dead_time`` (s), ``frames_written`` (count).
    """

    def __init__(self, simulator: FrameSimulator, stage: NanoprobeStage, name: str = "") -> None:
        self.simulator = simulator
        self.stage_ref = Reference(stage)
        self.exposure_time = soft_signal_rw(float, 0.01, units="s")
        self.dead_time = soft_signal_rw(float, 0.002, units="s")
        self.frames_written, self._set_frames_written = soft_signal_r_and_setter(int, 0)
        self._file: _FrameFile | None = None
        self._n_frames = 1
        self._external = False
        self._trigger_input: asyncio.Queue[TriggerPulse] | None = None
        super().__init__(name=name)

    def open_file(self, path: Path) -> None:
        self.close_file()
        self._file = _FrameFile(path, self.simulator.frame_shape)
        self._set_frames_written(0)

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def arm(self, n_frames: int, *, external: bool) -> None:
        """Expect ``n_frames``: internally timed, or one per pulse of the stage's trigger output."""
        self._n_frames = n_frames
        self._external = external
        if self._trigger_input is not None:
            self.stage_ref().trigger_output.disconnect(self._trigger_input)
            self._trigger_input = None
        if external:
            self._trigger_input = self.stage_ref().trigger_output.connect()

    async def acquire(self) -> None:
        """Take the armed frames; each one is appended to the file as soon as it is read out."""
        if self._file is None:
            raise RuntimeError(f"{self.name}: no file open; prepare the detector first")
        exposure, dead = await asyncio.gather(self.exposure_time.get_value(), self.dead_time.get_value())
        period = exposure + max(dead, MIN_DEAD_TIME_S)
        start = time.monotonic()
        for i in range(self._n_frames):
            if self._external:
                assert self._trigger_input is not None
                pulse = await self._trigger_input.get()
                x_um, y_um = pulse.x_um, pulse.y_um
                exposed, exposed_epoch_s = time.monotonic(), time.time()
            else:
                await asyncio.sleep(max(0.0, start + i * period - time.monotonic()))
                x_um, y_um = await self.stage_ref().read_position_um()
                exposed, exposed_epoch_s = time.monotonic(), time.time()
            if self.simulator.cache_frames:  # prepared frames: a Poisson draw, cheaper than a thread hop
                frame = self.simulator.frames_at(x_um, y_um, exposure)
            else:
                frame = await asyncio.to_thread(self.simulator.frames_at, x_um, y_um, exposure)
            # The event loop sleeps in whole milliseconds: a shorter wait would cap the rate
            # near 500 frames/s, so below that the frame is read out at once.
            remaining = exposed + exposure - time.monotonic()
            if remaining > 0.001:
                await asyncio.sleep(remaining)
            file = self._file
            if file is None:  # stopped while exposing
                return
            file.append(frame[0], x_um, y_um, exposed_epoch_s)
            self._set_frames_written(file.frames)

    def disarm(self) -> None:
        if self._trigger_input is not None:
            self.stage_ref().trigger_output.disconnect(self._trigger_input)
            self._trigger_input = None


@dataclass
class NanoprobeTriggerLogic(DetectorTriggerLogic):
    """Internal triggering (timed by the camera) or external edges from the stage."""

    driver: NanoprobeDriver

    def config_sigs(self) -> set[SignalR]:
        return {self.driver.exposure_time, self.driver.dead_time}

    def get_deadtime(self, config_values: SignalDict) -> float:
        return MIN_DEAD_TIME_S

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        if livetime:
            await self.driver.exposure_time.set(livetime)
        if deadtime:
            await self.driver.dead_time.set(deadtime)
        self.driver.arm(num, external=False)

    async def prepare_edge(self, num: int, livetime: float) -> None:
        if livetime:
            await self.driver.exposure_time.set(livetime)
        self.driver.arm(num, external=True)

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo(livetime=await self.driver.exposure_time.get_value())


class NanoprobeAcquireLogic(DetectorAcquireLogic):
    """Runs :meth:`NanoprobeDriver.acquire` in the background."""

    def __init__(self, driver: NanoprobeDriver) -> None:
        self.driver = driver
        self.task: asyncio.Task | None = None

    async def start_acquiring(self) -> None:
        self.task = asyncio.create_task(self.driver.acquire())

    async def wait_for_idle(self) -> None:
        if self.task is not None:
            await self.task

    async def ensure_stopped(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        self.driver.disarm()


class _PositionUnitsProvider(StreamResourceDataProvider):
    """StreamResourceDataProvider whose data keys also carry units."""

    def __init__(self, *args, units: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.units = units

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        keys = await super().make_datakeys(collections_per_event)
        for key, unit in self.units.items():
            if key in keys:
                keys[key]["units"] = unit
        return keys


class NanoprobeDataLogic(DetectorDataLogic):
    """Writes ``<name>.h5`` (SWMR): frames, and the x/y positions (µm) captured with each frame.

    Data keys: ``<name>`` (frames, uint32 counts), ``<name>-x`` and ``<name>-y`` (µm),
    ``<name>-time`` (when the frame's exposure began, s since the epoch).
    """

    def __init__(self, path_provider: PathProvider, driver: NanoprobeDriver) -> None:
        self.path_provider = path_provider
        self.driver = driver

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self.path_provider(datakey_name)
        path = Path(str(info.directory_path)) / f"{info.filename}.h5"
        self.driver.open_file(path)
        shape = self.driver.simulator.frame_shape
        resources = [
            StreamResourceInfo(
                data_key=datakey_name,
                shape=shape,
                chunk_shape=(1, *shape),
                dtype_numpy=np.dtype(np.uint32).str,
                parameters={"dataset": DATA_PATH},
            ),
            *(
                StreamResourceInfo(
                    data_key=f"{datakey_name}-{suffix}",
                    shape=(),
                    chunk_shape=(1024,),
                    dtype_numpy=np.dtype(np.float64).str,
                    parameters={"dataset": dataset},
                )
                for suffix, dataset in (("x", X_PATH), ("y", Y_PATH), ("time", TIME_PATH))
            ),
        ]
        return _PositionUnitsProvider(
            uri=f"{info.directory_uri}{info.filename}.h5",
            resources=resources,
            mimetype="application/x-hdf5",
            collections_written_signal=self.driver.frames_written,
            units={
                datakey_name: "counts",
                f"{datakey_name}-x": "um",
                f"{datakey_name}-y": "um",
                f"{datakey_name}-time": "s",
            },
        )

    async def stop(self) -> None:
        self.driver.close_file()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class NanoprobeFlyDetector(StandardDetector):
    """Simulated diffraction detector for fly scans (ophyd-async, flyable itself).

    Internally triggered (``trigger()`` in step scans, or ``prepare(TriggerInfo(...))`` +
    kickoff) it exposes at the stage's current position. With ``DetectorTrigger.EXTERNAL_EDGE`` it
    takes one frame per pulse of ``stage.trigger_output`` during a raster (see
    :func:`~nanobeam_bluesky.devices.fly_raster_scan`). Frames and positions go to HDF5 (SWMR) and
    are announced with StreamResource/StreamDatum documents.

    Args:
        simulator: what the frames look like (sample, instrument, count rate).
        stage: the sample stage it reads and is triggered by.
        path_provider: where files go; or give ``directory`` for UUID-named files there.
    """

    def __init__(
        self,
        simulator: FrameSimulator,
        stage: NanoprobeStage,
        *,
        path_provider: PathProvider | None = None,
        directory: str | Path | None = None,
        name: str = "",
    ) -> None:
        if path_provider is None:
            if directory is None:
                raise InputError("give the detector a path_provider or a directory for its HDF5 files")
            path_provider = StaticPathProvider(UUIDFilenameProvider(), Path(directory).resolve())
        self.driver = NanoprobeDriver(simulator, stage)
        self.add_detector_logics(
            NanoprobeTriggerLogic(self.driver),
            NanoprobeAcquireLogic(self.driver),
            NanoprobeDataLogic(path_provider, self.driver),
        )
        super().__init__(name=name)
