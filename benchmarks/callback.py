"""Live-analysis throughput: synthetic event pages and StreamDatum batches through NanobeamCallback.

    python benchmarks/callback.py [--model FILE] [--frames 20000] [--page 50] [--datum 200]
                                  [--rate 1000] [--batch-size 1024]

For each way frames reach the callback (EventPages with the frames inline, as ``bp.grid_scan``
with a classic detector produces; StreamDatum batches pointing into an HDF5 file, as an ophyd-async
fly scan produces) it prints:

- flat out: the sustained frames/s from the first document to the last derived row
  (``callback.flush()``), and its ratio to the raw predictor throughput measured here first;
- paced at ``--rate`` frames/s (a detector that runs at that rate): the added latency per frame
  (raw documents received -> derived row emitted; mean and worst);
- the time the sending (RunEngine) thread spent inside the callback per frame, which is all the
  scan ever waits for.

Frames are simulated once (a pool of distinct noisy frames, reused) so the simulator is not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
from event_model import compose_run

from nanobeam_bluesky.callbacks import NanobeamCallback
from nanobeam_bluesky.inference import Predictor, load_pretrained
from nanobeam_bluesky.physics import Instrument, simulate, to_counts

POOL = 2048


def _predictor(path: str | None) -> Predictor:
    if path:
        return Predictor.from_file(path)
    try:
        return load_pretrained()
    except FileNotFoundError:
        cached = sorted(Path(".pytest_cache/d/nanobeam-tiny-model").glob("tiny-*.pt"))
        if not cached:
            raise SystemExit(
                "no pretrained model yet: pass --model FILE (or run the tests once, which cache a tiny model)"
            ) from None
        print(f"NOTE: no pretrained model; using the tiny test model {cached[0]}")
        return Predictor.from_file(cached[0])


def _frame_pool(rng: np.random.Generator) -> np.ndarray:
    params = (rng.uniform(-0.005, 0.005, POOL), rng.uniform(-0.05, 0.05, POOL), rng.uniform(-0.1, 0.1, POOL))
    return to_counts(simulate(*params, Instrument(), upsample=4), 7.0, scale=1.0, rng=rng).astype(np.uint32)


def raw_rate(predictor: Predictor, pool: np.ndarray, n: int, batch_size: int) -> float:
    """frames/s of predictor.predict on batches of ``batch_size`` (the callback's largest batch)."""
    predictor.predict(pool[:256])  # warm-up
    rates = []
    for _ in range(3):  # best of three: the machine may be shared
        start = time.perf_counter()
        done = 0
        while done < n:
            chunk = pool[: min(len(pool), batch_size, n - done)]
            predictor.predict(chunk)
            done += len(chunk)
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


class Replay:
    """Feeds synthetic raw documents to a fresh callback and measures what happens."""

    def __init__(self, predictor: Predictor, batch_size: int) -> None:
        self.callback = NanobeamCallback(predictor, batch_size=batch_size)
        self.rows = 0
        self.callback.subscribe(self._count)
        self.send_s = 0.0

    def _count(self, name: str, doc: dict) -> None:
        if name == "event_page":
            self.rows += len(doc["seq_num"])

    def send(self, name: str, doc: dict) -> None:
        t0 = time.perf_counter()
        self.callback(name, doc)
        self.send_s += time.perf_counter() - t0


def _pace(start: float, sent: int, rate: float | None) -> None:
    if rate:
        delay = start + sent / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def replay_event_pages(
    predictor: Predictor, pool: np.ndarray, n: int, page: int, batch_size: int, rate: float | None
) -> tuple[float, Replay]:
    replay = Replay(predictor, batch_size)
    run = compose_run(metadata={"plan_name": "benchmark", "motors": ["x"]})
    desc = run.compose_descriptor(
        name="primary",
        data_keys={
            "cam_image": {"source": "sim", "dtype": "array", "shape": [64, 64], "dtype_numpy": "<u4"},
            "x": {"source": "sim", "dtype": "number", "shape": [], "units": "um"},
        },
        object_keys={"x": ["x"], "cam": ["cam_image"]},
    )
    replay.send("start", run.start_doc)
    replay.send("descriptor", desc.descriptor_doc)
    start = time.perf_counter()
    for i in range(0, n, page):
        m = min(page, n - i)
        idx = np.arange(i, i + m) % len(pool)
        now = time.time()
        doc = desc.compose_event_page(
            data={"cam_image": list(pool[idx]), "x": (np.arange(i, i + m) * 0.05).tolist()},
            timestamps={"cam_image": [now] * m, "x": [now] * m},
            validate=False,
        )
        _pace(start, i, rate)
        replay.send("event_page", doc)
    replay.send("stop", run.compose_stop(validate=False))
    replay.callback.flush()
    elapsed = time.perf_counter() - start
    replay.callback.close()
    assert replay.rows == n, (replay.rows, n)
    return n / elapsed, replay


def replay_stream_datums(
    predictor: Predictor,
    pool: np.ndarray,
    n: int,
    datum: int,
    batch_size: int,
    rate: float | None,
    directory: Path,
) -> tuple[float, Replay]:
    """A writer thread appends frames to an SWMR HDF5 file; a StreamDatum follows every ``datum``."""
    path = directory / "frames.h5"
    replay = Replay(predictor, batch_size)
    run = compose_run(metadata={"plan_name": "benchmark"})
    desc = run.compose_descriptor(
        name="primary",
        data_keys={
            "cam": {
                "source": path.as_uri(),
                "dtype": "array",
                "shape": [1, 64, 64],
                "dtype_numpy": "<u4",
                "external": "STREAM:",
            }
        },
    )
    bundle = run.compose_stream_resource(
        mimetype="application/x-hdf5",
        uri=path.as_uri(),
        data_key="cam",
        parameters={"dataset": "/entry/data/data", "chunk_shape": [1, 64, 64]},
    )
    with h5py.File(path, "w", libver="latest") as f:
        dset = f.create_dataset(
            "/entry/data/data",
            shape=(0, 64, 64),
            maxshape=(None, 64, 64),
            chunks=(1, 64, 64),
            dtype=np.uint32,
        )
        f.swmr_mode = True
        replay.send("start", run.start_doc)
        replay.send("descriptor", desc.descriptor_doc)
        replay.send("stream_resource", bundle.stream_resource_doc)
        written = threading.Semaphore(0)
        start = time.perf_counter()

        def write() -> None:  # the detector: one datum's worth of frames at a time
            for i in range(0, n, datum):
                m = min(datum, n - i)
                _pace(start, i + m, rate)
                dset.resize(i + m, axis=0)
                dset[i:] = pool[np.arange(i, i + m) % len(pool)]
                dset.flush()
                written.release()

        writer = threading.Thread(target=write)
        writer.start()
        for i in range(0, n, datum):
            m = min(datum, n - i)
            written.acquire()
            doc = bundle.compose_stream_datum(
                indices={"start": i, "stop": i + m},
                seq_nums={"start": i + 1, "stop": i + m + 1},
                descriptor=desc.descriptor_doc,
                validate=False,
            )
            replay.send("stream_datum", doc)
        writer.join()
        replay.send("stop", run.compose_stop(validate=False))
        replay.callback.flush()
        elapsed = time.perf_counter() - start
        replay.callback.close()
    assert replay.rows == n, (replay.rows, n)
    return n / elapsed, replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--frames", type=int, default=20000, help="frames per flat-out replay")
    parser.add_argument("--page", type=int, default=50, help="frames per EventPage")
    parser.add_argument("--datum", type=int, default=200, help="frames per StreamDatum")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced detector rate, frames/s")
    parser.add_argument("--paced-seconds", type=float, default=5.0, help="length of each paced replay")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    predictor = _predictor(args.model)
    pool = _frame_pool(np.random.default_rng(0))
    raw = raw_rate(predictor, pool, args.frames, args.batch_size)
    print(f"model {predictor.model_id} ({predictor.n_members} members), batch_size {args.batch_size}")
    print(f"raw predictor.predict, batches of {args.batch_size}: {raw:,.0f} frames/s")
    paced_n = int(args.rate * args.paced_seconds)
    print(
        f"{'source':<26} {'flat-out fr/s':>13} {'x raw':>6} {'paced at':>9} {'latency mean':>13} "
        f"{'max':>8} {'sender us/frame':>16}"
    )
    with tempfile.TemporaryDirectory(prefix="nanobeam-bench-") as tmp:
        cases = {
            f"EventPage x{args.page}": lambda r, n: replay_event_pages(
                predictor, pool, n, args.page, args.batch_size, r
            ),
            f"StreamDatum x{args.datum} (HDF5)": lambda r, n: replay_stream_datums(
                predictor, pool, n, args.datum, args.batch_size, r, Path(tmp)
            ),
        }
        for name, run in cases.items():
            flat, flat_replay = run(None, args.frames)
            _, paced = run(args.rate, paced_n)
            s = paced.callback.stats
            sender = 1e6 * flat_replay.send_s / args.frames
            print(
                f"{name:<26} {flat:>13,.0f} {flat / raw:>6.2f} {args.rate:>7,.0f}/s "
                f"{1e3 * s.mean_latency_s:>10.1f} ms {1e3 * s.latency_max_s:>5.0f} ms {sender:>16.1f}"
            )


if __name__ == "__main__":
    main()
