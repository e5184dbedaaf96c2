"""Scan plans for the simulated nanoprobe."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator
from ophyd_async.core import DetectorTrigger, TriggerInfo

from ..errors import InputError
from ._fly_detector import MIN_DEAD_TIME_S, NanoprobeFlyDetector
from ._stage import NanoprobeStage, RasterInfo, RasterPath

__all__ = ["fly_raster_scan"]


def fly_raster_scan(
    detector: NanoprobeFlyDetector,
    stage: NanoprobeStage,
    path: RasterPath,
    *,
    exposure_s: float = 0.01,
    dead_time_s: float = 0.002,
    flush_period_s: float = 0.2,
    stream_name: str = "primary",
    md: dict[str, Any] | None = None,
) -> MsgGenerator[None]:
    """Fly a raster: the stage visits every point of ``path`` and triggers one frame at each.

    The detector is prepared for external edges, the stage for one point per
    ``exposure_s + dead_time_s`` seconds; both are kicked off, then
    ``collect_while_completing`` emits StreamResource/StreamDatum documents every
    ``flush_period_s`` seconds. Each frame's x/y encoder positions (µm) are in the stream as
    ``<detector>-x`` and ``<detector>-y``; the start document has ``shape``, ``extents`` and
    ``hints.dimensions`` for maps.

    The RunEngine returns the run uid: ``(uid,) = RE(fly_raster_scan(...))``.
    """
    if exposure_s <= 0:
        raise InputError(f"exposure_s must be positive, got {exposure_s!r}")
    if dead_time_s < MIN_DEAD_TIME_S:
        raise InputError(
            f"dead_time_s must be at least the camera readout, {MIN_DEAD_TIME_S} s; got {dead_time_s!r}"
        )
    n = len(path)
    x_key, y_key = f"{detector.name}-x", f"{detector.name}-y"
    metadata: dict[str, Any] = {
        "plan_name": "fly_raster_scan",
        "detectors": [detector.name],
        "motors": [stage.y.name, stage.x.name],
        "num_points": n,
        "num_intervals": n - 1,
        "shape": list(path.shape),
        "extents": [list(path.extents[0]), list(path.extents[1])],
        "snaking": [False, path.snake],
        "hints": {"dimensions": [([y_key], stream_name), ([x_key], stream_name)]},
        "exposure_s": exposure_s,
        "dead_time_s": dead_time_s,
        "nanobeam_instrument": detector.driver.simulator.instrument.to_dict(),
    }
    metadata.update(md or {})
    trigger_info = TriggerInfo(
        trigger=DetectorTrigger.EXTERNAL_EDGE, number_of_events=n, livetime=exposure_s, deadtime=dead_time_s
    )

    @bpp.stage_decorator([stage, detector])
    @bpp.run_decorator(md=metadata)
    def inner() -> MsgGenerator[None]:
        yield from bps.prepare(detector, trigger_info, wait=True)
        yield from bps.prepare(stage, RasterInfo(path, exposure_s + dead_time_s), wait=True)
        yield from bps.declare_stream(detector, name=stream_name, collect=True)
        yield from bps.kickoff(detector, wait=True)
        yield from bps.kickoff(stage, wait=True)
        yield from bps.collect_while_completing(
            [stage, detector], [detector], flush_period=flush_period_s, stream_name=stream_name
        )

    yield from inner()
