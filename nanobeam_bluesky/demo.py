"""The main job: a simulated beamtime from scan to maps, in one call (``nanobeam demo``).

1. Start an embedded Tiled server (SQLite catalog in ``<out>/tiled``, loopback, API key).
2. Build the simulated nanoprobe over a Fig. 3-style phantom.
3. Fly-scan it with the RunEngine, with the NanobeamNN callback, TiledWriters (raw runs to
   ``/runs``, derived runs to ``/derived``), live maps and a progress bar subscribed.
4. Read the frames back from Tiled, fit them with the correlation fit (published and ours), and
   write one picture (truth, NN, fits) and a table of errors against the truth.

Ctrl-C stops the scan cleanly: the partial raw and derived runs are closed and stay readable.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from .evaluation import MapErrors, map_errors
from .inference import Predictor, load_pretrained
from .phantoms import Phantom, fig3_phantom
from .physics import PARAMETERS, Instrument, crlb
from .quality import FLAG_BITS

__all__ = ["DemoResult", "run_demo"]

DETECTOR = "nanoprobe"


@dataclass
class DemoResult:
    """What the demo made: run uids, where things are, and how well each method did."""

    tiled_uri: str
    api_key: str
    data_dir: Path
    raw_uid: str | None = None
    derived_uid: str | None = None
    frames: int = 0
    derived_rows: int = 0
    #: Derived rows per flag (nanobeam_bluesky.quality.Flag) that any row carries.
    flagged: dict[str, int] = field(default_factory=dict)
    picture: Path | None = None
    live_maps: list[Path] = field(default_factory=list)
    errors: dict[str, MapErrors] = field(default_factory=dict)
    #: frames/s of each method on the same frames (NN: predict() alone; fits: the fit alone).
    frames_per_s: dict[str, float] = field(default_factory=dict)
    crlb_rms: dict[str, float] = field(default_factory=dict)
    #: The bound with the film thickness (and count scale) unknown: what a model that fits the
    #: film per frame can reach.
    crlb_rms_film_unknown: dict[str, float] = field(default_factory=dict)
    scan_s: float = 0.0
    wall_s: float = 0.0
    interrupted: bool = False


class _ScanProgress:
    """Progress bar of frames acquired (raw documents) and analysed (derived rows)."""

    def __init__(self, total: int, callback: Any, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="fly scan", unit="frame", disable=not enabled)
        self.callback = callback
        self._image_resources: set[str] = set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "stream_resource" and doc.get("data_key") == DETECTOR:
            self._image_resources.add(doc["uid"])
        elif name == "stream_datum" and doc["stream_resource"] in self._image_resources:
            self.bar.update(doc["seq_nums"]["stop"] - doc["seq_nums"]["start"])
            self.bar.set_postfix(analysed=self.callback.stats.rows_emitted, refresh=False)

    def close(self) -> None:
        self.bar.set_postfix(analysed=self.callback.stats.rows_emitted)
        self.bar.close()


class _StopOnSigint:
    """RunEngine context manager: the first Ctrl-C pauses the scan at once (bluesky's own handler
    only asks for a pause at the next checkpoint, which a fly scan reaches at its end); the
    demo then aborts the run, so its stop document is written and the partial runs stay readable.
    """

    def __init__(self, RE: Any) -> None:
        self._RE = RE
        self._requested = threading.Event()
        self._released = threading.Event()

    def _watch(self) -> None:
        while not self._released.is_set():
            if self._requested.wait(0.2) and not self._released.is_set():
                self._requested.clear()
                with contextlib.suppress(Exception):  # already pausing or idle
                    self._RE.request_pause(defer=False)

    def __enter__(self) -> _StopOnSigint:
        self._released.clear()
        self._previous = signal.getsignal(signal.SIGINT)
        threading.Thread(target=self._watch, daemon=True, name="demo-sigint").start()
        signal.signal(signal.SIGINT, lambda signum, frame: self._requested.set())
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        signal.signal(signal.SIGINT, self._previous)


def _maps_from_rows(rows: dict[str, np.ndarray], phantom: Phantom) -> xr.Dataset:
    """Place derived rows on the phantom's grid by their own stage positions."""
    col = np.rint((rows[f"{DETECTOR}-x"] - phantom.origin_um[0]) / phantom.pixel_size_um).astype(int)
    row = np.rint((rows[f"{DETECTOR}-y"] - phantom.origin_um[1]) / phantom.pixel_size_um).astype(int)
    dims = ("scan_y", "scan_x")
    data = {}
    for p in PARAMETERS:
        grid = np.full(phantom.shape, np.nan)
        grid[row, col] = rows[p]
        data[p] = (dims, grid)
    return xr.Dataset(data)


def _record_rows(store: dict[str, list[np.ndarray]]):
    def record(name: str, doc: dict[str, Any]) -> None:
        if name == "event_page":
            for key, values in doc["data"].items():
                store.setdefault(key, []).append(np.asarray(values))

    return record


def run_demo(
    size: int = 64,
    out_dir: str | Path = "nanobeam-output",
    *,
    model: str | Path | None = None,
    exposure_s: float = 0.01,
    dead_time_s: float = 0.002,
    seed: int = 0,
    fit: bool = True,
    port: int | None = None,
    progress: bool = True,
    log=print,
) -> DemoResult:
    """Run the simulated beamtime; returns what it made (see :class:`DemoResult`)."""
    from bluesky import RunEngine
    from ophyd_async.core import init_devices

    from .callbacks import LiveStrainMaps, NanobeamCallback, mark_raw_runs
    from .devices import FrameSimulator, NanoprobeFlyDetector, NanoprobeStage, RasterPath, fly_raster_scan
    from .tiled.catalog import writer_batch_size
    from .tiled.server import ServerConfig, TiledServer, free_port
    from .tiled.spool import SpooledTiledWriter

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    detector_dir = out / "detector"
    detector_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_file(model) if model else load_pretrained()
    instrument: Instrument = predictor.instrument

    config = ServerConfig(data_dir=out / "tiled", readable=(detector_dir,), port=port or free_port())
    log(f"[1/4] starting Tiled on {config.url} (SQLite catalog in {config.data_dir})")
    # `nanobeam serve` streams every write (the in-memory store): the analysis can be followed
    log(
        f"      follow the analysis live from another shell: NANOBEAM_TILED_API_KEY=$(cat "
        f"{config.data_dir / 'api_key'}) nanobeam watch {config.url}"
    )
    server = TiledServer(config)
    result = DemoResult(tiled_uri=config.runs_url, api_key=server.api_key, data_dir=config.data_dir)
    with server:
        runs = server.client("runs")
        derived = server.client("derived")
        phantom = fig3_phantom(size, instrument=instrument)
        log(
            f"[2/4] simulated nanoprobe over a {size}x{size} Fig. 3 phantom "
            f"({phantom.pixel_size_um * 1e3:.0f} nm steps), model {predictor.model_id} "
            f"(K={predictor.n_members}{f'+{predictor.n_refiners} refining' if predictor.n_refiners else ''}, "
            f"sha256 {predictor.sha256[:12]})"
        )
        in_main_thread = threading.current_thread() is threading.main_thread()
        RE = RunEngine({}, context_managers=[_StopOnSigint] if in_main_thread else [])
        mark_raw_runs(RE)  # analysis_stage: "raw" in the scan's start document
        with init_devices():
            stage = NanoprobeStage(name="stage")
            detector = NanoprobeFlyDetector(
                FrameSimulator(phantom, instrument, seed=seed), stage, directory=detector_dir, name=DETECTOR
            )
        period = exposure_s + dead_time_s
        # Raw and derived runs go through local spools: a Tiled outage never stalls the scan. One
        # spool directory per catalog, so that a recovered spool file goes back where it belongs.
        batch_size = writer_batch_size(size, frame_rate_hz=1 / period)
        store = SpooledTiledWriter(runs, out / "spool" / "runs", batch_size=batch_size)
        derived_store = SpooledTiledWriter(derived, out / "spool" / "derived", batch_size=batch_size)
        callback = NanobeamCallback(predictor)
        maps = LiveStrainMaps(out / "maps", redraw_period_s=2.0)
        rows: dict[str, list[np.ndarray]] = {}
        for subscriber in (derived_store, maps, _record_rows(rows)):
            callback.subscribe(subscriber)
        bar = _ScanProgress(size * size, callback, progress)
        raw_starts: list[str] = []
        for subscriber in (store, callback, bar):
            RE.subscribe(subscriber)
        RE.subscribe(lambda name, doc: raw_starts.append(doc["uid"]), "start")

        path = RasterPath.grid(
            phantom.x_um[0], phantom.x_um[-1], size, phantom.y_um[0], phantom.y_um[-1], size, snake=True
        )
        log(
            f"[3/4] fly scan: {size * size} points, {exposure_s * 1e3:g} ms exposure + "
            f"{dead_time_s * 1e3:g} ms dead time, analysed live (Ctrl-C stops it cleanly)"
        )
        scan_start = time.perf_counter()
        _run_scan(
            RE,
            fly_raster_scan(
                detector, stage, path, exposure_s=exposure_s, dead_time_s=dead_time_s, flush_period_s=0.5
            ),
            result,
            raw_starts,
            callback,
            (store, derived_store),
            bar,
            log,
            phantom.description,
        )
        result.scan_s = time.perf_counter() - scan_start
        result.live_maps = list(maps.saved)
        merged = {k: np.concatenate(v) for k, v in rows.items()}
        result.derived_rows = len(merged.get("strain", ()))
        flags = merged.get("flag", np.zeros(0, dtype=int)).astype(int)
        result.flagged = {
            name: int(np.count_nonzero(flags & bit)) for name, bit in FLAG_BITS.items() if np.any(flags & bit)
        }
        starts = list(derived.search(_parent_query(result.raw_uid)).keys()) if result.raw_uid else []
        result.derived_uid = starts[0] if starts else None
        if result.interrupted or not result.raw_uid:
            log(
                f"interrupted: {result.derived_rows} frames recorded and analysed; the partial raw and "
                "derived runs are closed and readable in Tiled"
            )
            result.wall_s = time.perf_counter() - t0
            return result

        log("[4/4] reading the frames back from Tiled; NanobeamNN and correlation fits on the same frames")
        _compare_on_stored_frames(
            result,
            runs[result.raw_uid]["primary"],
            phantom,
            predictor,
            merged,
            fit=fit,
            progress=progress,
            out=out,
        )
    result.wall_s = time.perf_counter() - t0
    return result


def _run_scan(
    RE: Any,
    plan: Any,
    result: DemoResult,
    raw_starts: list[str],
    callback: Any,
    stores: tuple[Any, ...],
    bar: _ScanProgress,
    log: Any,
    phantom_description: str,
) -> None:
    """The fly scan, analysed live; Ctrl-C aborts it cleanly. Every frame is analysed and stored
    (or left safe in the spool) before it returns."""
    from bluesky.utils import RunEngineInterrupted

    try:
        RE(
            plan,
            sample="Fig. 3 phantom (simulated SrIrO3 on LSAT)",
            scan_type="fly_raster_scan",
            phantom=phantom_description,
        )
    except (RunEngineInterrupted, KeyboardInterrupt):
        result.interrupted = True
        # Aborting cancels the raster; bluesky logs that cancellation as an error: expected here.
        quiet = logging.getLogger("bluesky")
        level, quiet.level = quiet.level, logging.CRITICAL
        with contextlib.suppress(Exception):
            RE.abort("interrupted by the user (Ctrl-C)")
        quiet.setLevel(level)
    finally:
        result.raw_uid = raw_starts[0] if raw_starts else None
        callback.flush(timeout=120)
        callback.close()
        for store in stores:
            if not store.close(timeout=120):
                log(
                    f"Tiled has not taken every document yet; they are safe in {store.spool_dir} and "
                    "are written by the next writer on that spool"
                )
        bar.close()


def _compare_on_stored_frames(
    result: DemoResult,
    stream: Any,
    phantom: Phantom,
    predictor: Predictor,
    live_rows: dict[str, np.ndarray],
    *,
    fit: bool,
    progress: bool,
    out: Path,
) -> None:
    """The frames read back from Tiled: the live maps, NanobeamNN's speed and the correlation fits
    on the same frames, their errors against the truth and the bound, and the picture."""
    instrument = predictor.instrument
    truth = phantom.to_dataset()
    x_um, y_um = (np.asarray(stream[f"{DETECTOR}-{axis}"].read()) for axis in ("x", "y"))
    frames = np.asarray(stream[DETECTOR].read())  # ophyd-async frames: (N, 1, H, W)
    frames = frames.reshape(len(x_um), *frames.shape[-2:]).astype(np.float32)
    result.frames = len(frames)
    col = np.rint((x_um - phantom.origin_um[0]) / phantom.pixel_size_um).astype(int)
    row = np.rint((y_um - phantom.origin_um[1]) / phantom.pixel_size_um).astype(int)
    scan = np.zeros((*phantom.shape, *frames.shape[1:]), dtype=np.float32)
    scan[row, col] = frames

    results = {"NanobeamNN (live)": _maps_from_rows(live_rows, phantom)}
    start = time.perf_counter()
    predictor.predict(frames)
    result.frames_per_s["NanobeamNN (live)"] = len(frames) / (time.perf_counter() - start)
    if fit:
        from .fitting import CorrelationFitter, Library, LikelihoodFitter

        library = Library.from_instrument(instrument).load()
        fitters = {
            "correlation fit (published)": CorrelationFitter(library, progress=progress),
            "correlation fit (ours)": LikelihoodFitter(library, progress=progress),
        }
        for name, fitter in fitters.items():
            start = time.perf_counter()
            results[name] = fitter.fit(scan, instrument=instrument)
            result.frames_per_s[name] = len(frames) / (time.perf_counter() - start)
    result.errors = {name: map_errors(ds, truth) for name, ds in results.items()}
    pick = np.random.default_rng(0).choice(
        phantom.strain.size, size=min(200, phantom.strain.size), replace=False
    )
    strains, omegas, chis = (a.ravel()[pick] for a in phantom.parameters())
    bound = np.sqrt(np.mean(crlb(strains, omegas, chis, instrument) ** 2, axis=0))
    result.crlb_rms = dict(zip(PARAMETERS, bound.tolist(), strict=True))
    unknown = crlb(strains, omegas, chis, instrument, with_thickness=True, nuisance=("scale",))[:, :3]
    result.crlb_rms_film_unknown = dict(
        zip(PARAMETERS, np.sqrt(np.mean(unknown**2, axis=0)).tolist(), strict=True)
    )

    from .plotting import save_map_comparison

    result.picture = save_map_comparison(
        out / "demo-maps.png",
        truth,
        results,
        phantom.pixel_size_um,
        f"Simulated fly scan {phantom.shape[0]}×{phantom.shape[1]}, 7 counts: truth, NanobeamNN (live) "
        "and correlation fits",
    )


def _parent_query(uid: str):
    from tiled.queries import Key

    return Key("parent_uid") == uid


def report(result: DemoResult, out_dir: str | Path = "nanobeam-output") -> str:
    """The demo's closing summary: the table, the files, and commands to copy."""
    lines = []
    if result.errors:
        lines.append(f"{'method':<30}{'RMSE ε':>10}{'RMSE ω (°)':>12}{'RMSE χ (°)':>12}{'frames/s':>11}")
        for name, err in result.errors.items():
            lines.append(
                f"{name:<30}{err.rmse['strain']:>10.2e}{err.rmse['omega']:>12.2e}"
                f"{err.rmse['chi']:>12.2e}{result.frames_per_s.get(name, float('nan')):>11,.0f}"
            )
        for label, c in (
            ("Cramér–Rao bound, film known", result.crlb_rms),
            ("... film unknown (fitted)", result.crlb_rms_film_unknown),
        ):
            if c:
                lines.append(f"{label:<30}{c['strain']:>10.2e}{c['omega']:>12.2e}{c['chi']:>12.2e}")
    lines.append(
        f"{result.frames or result.derived_rows} frames, scan {result.scan_s:.0f} s, "
        f"wall time {result.wall_s:.0f} s; derived rows {result.derived_rows}, flagged: "
        + (", ".join(f"{name} {n}" for name, n in result.flagged.items()) or "none")
    )
    if result.picture:
        lines.append(f"picture: {result.picture}")
    for png in result.live_maps:
        lines.append(f"live maps: {png}")
    lines.append(f"Tiled: {result.tiled_uri}  (raw run {result.raw_uid}, derived run {result.derived_uid})")
    data_dir = shlex.quote(str(result.data_dir))
    detector_dir = shlex.quote(str(Path(out_dir).resolve() / "detector"))
    # Full paths into this environment: the commands run in a fresh shell, venv active or not.
    python = shlex.quote(sys.executable)
    nanobeam = shlex.quote(str(Path(sys.executable).with_name("nanobeam")))
    from .tiled.server import free_port

    port = free_port()  # free now; the demo's own server is gone
    runs = f"http://127.0.0.1:{port}/api/v1/metadata/runs"
    derived = f"http://127.0.0.1:{port}/api/v1/metadata/derived"
    maps_file = shlex.quote(str(Path(out_dir).resolve() / "maps.nc"))
    lines += [
        "Serve this catalog again, then query, replay and map it (the API key is in "
        f"{result.data_dir / 'api_key'}):",
        f"  {nanobeam} serve --data-dir {data_dir} --readable {detector_dir} --port {port} &",
        f"  export NANOBEAM_TILED_API_KEY=$(cat {data_dir}/api_key)",
        f'  {python} -c "from tiled.client import from_uri; from tiled.queries import Key; '
        f"derived = from_uri('{derived}', "
        "api_key=__import__('os').environ['NANOBEAM_TILED_API_KEY']); "
        f"print(list(derived.search(Key('parent_uid') == '{result.raw_uid}')))\"",
        f"  {nanobeam} replay {runs} {result.raw_uid}",
        f"  {nanobeam} predict {runs}/{result.raw_uid} --out {maps_file} --png",
    ]
    return "\n".join(lines)


def main(args: Any) -> int:
    """``nanobeam demo`` (see cli.py for the arguments)."""
    result = run_demo(
        args.size,
        args.out,
        model=args.model,
        exposure_s=args.exposure_ms / 1e3,
        dead_time_s=args.dead_time_ms / 1e3,
        seed=args.seed,
        fit=not args.no_fit,
        port=args.port,
        progress=not args.no_progress,
    )
    print(report(result, args.out), file=sys.stdout)
    return 130 if result.interrupted else 0
