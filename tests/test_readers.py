"""Reading frames stored outside the documents: legacy AD_HDF5 Resource/Datum (area-detector-handlers'
handler, through event-model's Filler as the live callback uses it) and HDF5 StreamResources (our
SWMR reader), from real HDF5 files, some of them still being written by another process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from area_detector_handlers.handlers import AreaDetectorHDF5SWMRHandler
from event_model import DocumentNames, Filler, compose_run, compose_stream_resource, schema_validators

from nanobeam_bluesky.callbacks import (
    AreaDetectorHDF5Handler,
    NanobeamCallback,
    StreamReadError,
    StreamResourceReader,
)
from nanobeam_bluesky.inference import Flag

ModelUnderTest = Any  # conftest.ModelUnderTest
FRAME_SHAPE = (64, 64)
DATA_PATH = "/entry/data/data"  # where the areaDetector HDF5 plugin writes its frames


def frame(i: int) -> np.ndarray:
    """Frame i: every pixel says i (and a pixel-dependent part), so any mix-up shows."""
    return (np.arange(np.prod(FRAME_SHAPE), dtype=np.uint32).reshape(FRAME_SHAPE) % 97) + 1000 * i


# An SWMR writer in its own process, as an areaDetector IOC or a detector's file writer is: it
# creates the file, starts SWMR and appends one frame per "write" line on stdin, answering "ok"
# once the frame is flushed.
WRITER = textwrap.dedent(
    f"""
    import sys
    import h5py
    import numpy as np
    shape = {FRAME_SHAPE!r}
    with h5py.File(sys.argv[1], "w", libver="latest") as f:
        data = f.create_dataset(
            "{DATA_PATH}", shape=(0, *shape), maxshape=(None, *shape), dtype=np.uint32, chunks=(1, *shape)
        )
        f.swmr_mode = True
        print("ok", flush=True)
        for line in sys.stdin:
            i = data.shape[0]
            data.resize(i + 1, axis=0)
            data[i] = (np.arange(np.prod(shape), dtype=np.uint32).reshape(shape) % 97) + 1000 * i
            data.flush()
            print("ok", flush=True)
    """
)


class SWMRWriter:
    """The writer process: ``write()`` appends the next frame and returns once it is flushed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frames = 0
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._ack()

    def _ack(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "ok", f"SWMR writer failed (exit {self.process.poll()})"

    def write(self, n: int = 1) -> None:
        assert self.process.stdin is not None
        for _ in range(n):
            self.process.stdin.write("write\n")
            self.process.stdin.flush()
            self._ack()
            self.frames += 1

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def writer(workdir: Path) -> Iterator[SWMRWriter]:
    w = SWMRWriter(workdir / "detector.h5")
    try:
        yield w
    finally:
        w.close()


def legacy_run(path: Path, frame_per_point: int, spec: str = "AD_HDF5") -> tuple[Any, Any, Any]:
    """A run bundle, its AD_HDF5 resource bundle (as ophyd's HDF5 plugin writes it) and its descriptor."""
    run = compose_run(metadata={"plan_name": "count"})
    resource = run.compose_resource(
        spec=spec,
        root="/",
        resource_path=str(path).lstrip("/"),
        resource_kwargs={"frame_per_point": frame_per_point},
    )
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            "cam_image": {
                "source": "PV:cam1",
                "dtype": "array",
                "shape": [frame_per_point, *FRAME_SHAPE],
                "dtype_numpy": "<u4",
                "external": "FILESTORE:",
            }
        },
    )
    return run, resource, descriptor


def fill_point(filler: Filler, resource: Any, descriptor: Any, point: int) -> np.ndarray:
    """The frames of one point, as the live callback gets them: Datum and Event through the Filler."""
    datum = resource.compose_datum(datum_kwargs={"point_number": point})
    filler("datum", datum)
    event = descriptor.compose_event(
        data={"cam_image": datum["datum_id"]},
        timestamps={"cam_image": time.time()},
        filled={"cam_image": False},
    )
    filled = filler.fill_event(event, include=["cam_image"], inplace=False)
    return np.asarray(filled["data"]["cam_image"])


def registry() -> dict[str, Any]:
    return {spec: AreaDetectorHDF5Handler for spec in AreaDetectorHDF5Handler.specs}


# ---------------------------------------------------------------------------- legacy AD_HDF5


def test_the_handler_is_area_detector_handlers_for_both_specs() -> None:
    assert issubclass(AreaDetectorHDF5Handler, AreaDetectorHDF5SWMRHandler)
    assert AreaDetectorHDF5Handler.specs == {"AD_HDF5", "AD_HDF5_SWMR"}


@pytest.mark.parametrize("spec", ["AD_HDF5", "AD_HDF5_SWMR"])
def test_ad_hdf5_points_of_a_closed_file_are_their_frames(workdir: Path, spec: str) -> None:
    """A file the plugin has closed (written without SWMR): each point is its frame_per_point frames."""
    path = workdir / "plugin.h5"
    with h5py.File(path, "w") as f:
        f[DATA_PATH] = np.stack([frame(i) for i in range(6)])
    run, resource, descriptor = legacy_run(path, frame_per_point=2, spec=spec)
    filler = Filler(registry(), inplace=False)
    for name, doc in (
        ("start", run.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("resource", resource.resource_doc),
    ):
        filler(name, doc)
    for point in (2, 0, 1):  # any order: the Filler caches one handler per resource
        frames = fill_point(filler, resource, descriptor, point)
        assert frames.shape == (2, *FRAME_SHAPE) and frames.dtype == np.uint32
        assert np.array_equal(frames, np.stack([frame(2 * point), frame(2 * point + 1)]))
    filler.close()


def test_ad_hdf5_frames_are_read_while_the_detector_writes_the_file(writer: SWMRWriter) -> None:
    """ophyd names the resource AD_HDF5 whether or not the IOC writes SWMR: frames flushed after the
    file was opened, after the first point, and after the point's event arrived are all read."""
    run, resource, descriptor = legacy_run(writer.path, frame_per_point=1)
    filler = Filler(registry(), inplace=False)
    for name, doc in (
        ("start", run.start_doc),
        ("descriptor", descriptor.descriptor_doc),
        ("resource", resource.resource_doc),
    ):
        filler(name, doc)
    for point in range(3):
        writer.write()
        assert np.array_equal(fill_point(filler, resource, descriptor, point), frame(point)[None])

    # The next event arrives before its frame is flushed: the handler says so (OSError, which
    # the Filler retries with its backoff), and the filled event has the frame once it is written.
    with AreaDetectorHDF5Handler(str(writer.path), frame_per_point=1) as handler:
        with pytest.raises(OSError, match=r"has 3 frames; frames 3\.\.3 are not written yet"):
            handler(point_number=3)
    result: dict[str, Any] = {}
    reader = threading.Thread(
        target=lambda: result.update(frames=fill_point(filler, resource, descriptor, 3)), daemon=True
    )
    reader.start()
    writer.write()
    reader.join(timeout=30)
    assert np.array_equal(result["frames"], frame(3)[None])
    filler.close()


def validate(docs: list[tuple[str, dict[str, Any]]]) -> None:
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)


def test_a_missing_ad_hdf5_file_flags_its_rows(model: ModelUnderTest, workdir: Path) -> None:
    """The live callback: the file a resource names is not there: every row INVALID, no exception."""
    run, resource, descriptor = legacy_run(workdir / "never_written.h5", frame_per_point=1)
    callback = NanobeamCallback(model.predictor, read_timeout_s=1.0)  # waits 1 s for the file
    derived: list[tuple[str, dict[str, Any]]] = []
    callback.subscribe(lambda name, doc: derived.append((name, doc)))
    callback("start", run.start_doc)
    callback("descriptor", descriptor.descriptor_doc)
    callback("resource", resource.resource_doc)
    datums = [resource.compose_datum(datum_kwargs={"point_number": i}) for i in range(4)]
    for datum in datums:
        callback("datum", datum)
    now = time.time()
    callback(
        "event_page",
        descriptor.compose_event_page(
            data={"cam_image": [d["datum_id"] for d in datums]},
            timestamps={"cam_image": [now] * 4},
            seq_num=[1, 2, 3, 4],
            time=[now] * 4,
            filled={"cam_image": [False] * 4},
        ),
    )
    callback("stop", run.compose_stop())
    assert callback.flush(timeout=60)
    callback.close()
    validate(derived)
    pages = [doc for name, doc in derived if name == "event_page"]
    flags = np.concatenate([p["data"]["flag"] for p in pages])
    assert len(flags) == 4 and np.all(flags & Flag.INVALID)
    (stop,) = [doc for name, doc in derived if name == "stop"]
    assert stop["exit_status"] == "fail"
    assert "4 frames could not be read (flag INVALID)" in stop["reason"]


# ---------------------------------------------------------------------------- StreamResource


def stream_resource(path: Path, dataset: str = DATA_PATH, mimetype: str = "application/x-hdf5") -> Any:
    """A StreamResource as ophyd-async's HDF5 writers compose it."""
    bundle = compose_stream_resource(
        mimetype=mimetype,
        uri=f"file://localhost{path}",
        data_key="flydet",
        parameters={"dataset": dataset, "chunk_shape": [1, *FRAME_SHAPE]},
    )
    return bundle.stream_resource_doc


def test_stream_resource_rows_are_read_as_the_detector_appends_them(writer: SWMRWriter) -> None:
    reader = StreamResourceReader(stream_resource(writer.path), timeout_s=30)
    try:
        writer.write(3)
        assert np.array_equal(reader.read(0, 3), np.stack([frame(i) for i in range(3)]))
        writer.write(2)  # appended after the file was opened and first read
        assert np.array_equal(reader.read(3, 5), np.stack([frame(3), frame(4)]))

        # Rows announced before the writer flushed them: the read waits for them.
        result: dict[str, np.ndarray] = {}
        waiting = threading.Thread(target=lambda: result.update(rows=reader.read(5, 7)), daemon=True)
        waiting.start()
        writer.write(2)
        waiting.join(timeout=60)
        assert np.array_equal(result["rows"], np.stack([frame(5), frame(6)]))
    finally:
        reader.close()


def test_stream_resource_rows_never_written_are_a_stream_read_error(writer: SWMRWriter) -> None:
    writer.write(2)
    reader = StreamResourceReader(stream_resource(writer.path), timeout_s=0.2)
    try:
        with pytest.raises(StreamReadError, match=r"has 2 rows after 0\.2 s; rows 2\.\.3 were announced"):
            reader.read(2, 4)
        assert np.array_equal(reader.read(0, 2), np.stack([frame(0), frame(1)]))  # still usable
    finally:
        reader.close()


def test_stream_resource_errors_name_the_problem(workdir: Path) -> None:
    missing = StreamResourceReader(stream_resource(workdir / "missing.h5"), timeout_s=0.1)
    with pytest.raises(StreamReadError, match=r"could not open .*missing\.h5 for SWMR reading"):
        missing.read(0, 1)
    path = workdir / "other.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f["/entry/other"] = np.zeros((2, *FRAME_SHAPE), dtype=np.uint32)
    no_dataset = StreamResourceReader(stream_resource(path), timeout_s=0.1)
    with pytest.raises(StreamReadError, match=f"has no dataset {DATA_PATH}"):
        no_dataset.read(0, 1)
    no_dataset.close()
    with pytest.raises(StreamReadError, match="only HDF5"):
        StreamResourceReader(stream_resource(path, mimetype="multipart/related;type=image/tiff"))
