"""The ``nanobeam`` command line. Each sub-command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import InputError, NanobeamError

if TYPE_CHECKING:  # imported where used, so that `nanobeam --help` stays fast
    from .physics import Instrument


def _instrument(path: str | None) -> Instrument:
    from .physics import Instrument

    return Instrument() if path is None else Instrument.load(path)


def _add_instrument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instrument",
        metavar="CONFIG",
        help="instrument YAML/JSON (default: the seed experiment of docs/physics.md)",
    )


# ------------------------------------------------------------------ simulate-library
def cmd_simulate_library(args: argparse.Namespace) -> int:
    import time

    from .physics import write_library

    instrument = _instrument(args.instrument)
    start = time.perf_counter()
    path = write_library(
        args.out,
        instrument,
        grid_points=args.grid,
        upsample=args.upsample,
        max_counts=args.max_counts,
    )
    n = (args.grid or instrument.grid_points) ** 3
    print(f"wrote {n} frames to {path} in {time.perf_counter() - start:.1f} s")
    return 0


def _add_simulate_library(sub) -> None:
    p = sub.add_parser("simulate-library", help="simulate the (strain, omega, chi) grid library")
    p.add_argument("--grid", type=int, default=None, help="points per parameter (default 41)")
    p.add_argument("--out", default="library.h5", help="output HDF5 file")
    p.add_argument("--upsample", type=int, default=None, help="sub-pixels per pixel per axis")
    p.add_argument("--max-counts", type=float, default=7.0, help="count level stored with it")
    _add_instrument(p)
    p.set_defaults(func=cmd_simulate_library)


# ------------------------------------------------------------------ preview
def cmd_preview(args: argparse.Namespace) -> int:
    from .plotting import save_frame_gallery

    out = save_frame_gallery(
        args.out, _instrument(args.instrument), max_counts=args.max_counts, seed=args.seed
    )
    print(f"wrote {out}")
    return 0


def _add_preview(sub) -> None:
    p = sub.add_parser("preview", help="simulate frames across the parameter box; write a PNG")
    p.add_argument("--out", default="nanobeam-output/frames.png", help="PNG file to write")
    p.add_argument("--max-counts", type=float, default=7.0, help="counts at the Laue maximum")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson noise")
    _add_instrument(p)
    p.set_defaults(func=cmd_preview)


# ------------------------------------------------------------------ train
def _recipe_changes(args: argparse.Namespace, *, plan_fields: bool = True) -> dict[str, Any]:
    """The recipe fields the command line sets (``plan_fields``: epochs, frames and pool too)."""
    values = {
        "thickness_spread": args.thickness_spread,
        "background_max": args.background_max,
        "mask_fraction": args.mask_fraction,
        "batch_size": args.batch_size,
    }
    if plan_fields:
        values |= {
            "epochs": args.epochs,
            "frames_per_epoch": args.frames_per_epoch,
            "pool_size": args.pool_size,
        }
    changes: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
    if args.hidden:
        changes["architecture_kwargs"] = {"hidden": tuple(args.hidden)}
    if args.refine is not None:  # read by the refining stage alone
        changes["refine_strain"] = args.refine == "strain"
    return changes


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from .training import RECIPES, train_ensemble

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device")
    # No --recipe: both stages in one file, unless --base names a coarse model (then as before:
    # the default recipe, which refuses a base).
    recipe_name = args.recipe or ("default" if args.base else "two-stage")
    command = "nanobeam " + " ".join(shlex.quote(a) for a in args.argv)
    if recipe_name == "two-stage":
        return _train_two_stage(args, command)
    if args.time_budget is not None:
        raise InputError(
            f"--time-budget plans both stages: leave out --recipe {recipe_name} (or give --recipe two-stage)"
        )
    recipe = RECIPES[recipe_name].replace(**_recipe_changes(args))
    members = args.members if args.members is not None else (1 if recipe.name == "paper" else 4)
    sha, meta = train_ensemble(
        recipe,
        members,
        args.out,
        _instrument(args.instrument),
        seed=args.seed,
        workdir=args.workdir,
        device=args.device,
        library=args.library,
        command=command,
        base=args.base,
    )
    what = f"{members} refining members on {args.base}" if "refiner" in meta else f"{members} members"
    print(f"wrote {args.out} ({what}, sha256 {sha[:12]})")
    _print_test_rmse(meta["metrics"]["ensemble"])
    return 0


def _print_test_rmse(ens: dict[str, Any]) -> None:
    film = f", film {ens['rmse_thickness']:.3g} A" if "rmse_thickness" in ens else ""
    print(
        "test RMSE of the networks: strain {rmse_strain:.3g}, omega {rmse_omega:.3g} deg, chi {rmse_chi:.3g} "
        "deg{film}".format(**ens, film=film)
    )


def _train_two_stage(args: argparse.Namespace, command: str) -> int:
    """``nanobeam train --instrument X --out Y [--time-budget 60m]``: both stages, one file."""
    import dataclasses
    from pathlib import Path

    from .training import DEFAULT_RECIPE, REGISTERED_RECIPE
    from .training.plan import (
        check_resume_overrides,
        check_roi_holds,
        load_plan,
        parse_duration,
        plan_two_stage,
        train_two_stage,
    )

    if args.base:
        raise InputError(
            "--base is for --recipe registered; the two-stage training makes its own coarse stage"
        )
    if args.library:
        raise InputError("--library is for --recipe paper; the two-stage training simulates its frames")
    budget_s = parse_duration(args.time_budget or "60m")
    instrument = _instrument(args.instrument)
    check_roi_holds(instrument)
    workdir = Path(args.workdir) if args.workdir else Path(f"{args.out}.work")
    plan = load_plan(workdir, budget_s, instrument, args.seed)
    overrides = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "frames_per_epoch": args.frames_per_epoch,
            "pool_size": args.pool_size,
        }.items()
        if v is not None
    }
    if plan is not None:
        check_resume_overrides(plan, overrides, args.members, workdir)
    else:
        changes = _recipe_changes(args, plan_fields=False)
        print(f"timing a few training steps of each stage on {args.device} ...", flush=True)
        plan = plan_two_stage(
            budget_s,
            instrument,
            coarse=DEFAULT_RECIPE.replace(**changes),
            refiner=REGISTERED_RECIPE.replace(**changes),
            device=args.device,
            # Epochs and frames of every member given: the budget decides nothing to refuse.
            sizes_given=args.epochs is not None and args.frames_per_epoch is not None,
        )
        # Explicit --members / --epochs / --frames-per-epoch / --pool-size override the plan's.
        if overrides or args.members is not None:
            members = {"coarse_members": args.members, "refiner_members": args.members}
            if args.members is None:
                members = {}
            plan = dataclasses.replace(
                plan,
                coarse=plan.coarse.replace(**overrides),
                refiner=plan.refiner.replace(**overrides),
                limits=None if overrides else plan.limits,  # sizes given: not re-planned
                **members,
            )
    print(plan.describe(), flush=True)
    sha, meta = train_two_stage(
        plan, args.out, instrument, workdir=workdir, seed=args.seed, device=args.device, command=command
    )
    print(
        f"wrote {args.out} (two stages: {plan.coarse_members} coarse + {plan.refiner_members} refining "
        f"members, sha256 {sha[:12]}; checkpoints in {workdir})"
    )
    _print_test_rmse(meta["metrics"]["ensemble"])
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model for an instrument (both stages, or one recipe's ensemble) into a file"
    )
    p.add_argument(
        "--recipe",
        choices=["two-stage", "default", "paper", "registered"],
        default=None,
        help="two-stage (when no --recipe is given): the coarse ensemble and its refining stage in one "
        "file, planned to --time-budget; default: the coarse ensemble alone; registered: the refining "
        "stage for the --base model (see README)",
    )
    p.add_argument(
        "--time-budget",
        default=None,
        help="two-stage: wall-clock time to plan both stages for, e.g. 90s, 45m, 1h, 1.5h (default 60m)",
    )
    p.add_argument("--base", default=None, help="coarse model file the registered recipe refines")
    p.add_argument(
        "--members", type=int, default=None, help="ensemble size (default 4; paper 1; two-stage: planned)"
    )
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument(
        "--workdir",
        default=None,
        help="checkpoints and metrics logs; the same command resumes from it (two-stage default: OUT.work)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument(
        "--frames-per-epoch",
        type=int,
        default=None,
        help="simulated frames per epoch (default: the recipe's)",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="noise-free frames kept and re-noised (default: the recipe's)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="frames per step (default: the recipe's)")
    p.add_argument(
        "--thickness-spread",
        type=float,
        default=None,
        help="draw each frame's film thickness within +- this fraction of the instrument's (e.g. 0.35)",
    )
    p.add_argument(
        "--background-max",
        type=float,
        default=None,
        help="add a flat background uniform in [0, this] counts per binned pixel to each frame (e.g. 0.1)",
    )
    p.add_argument(
        "--mask-fraction",
        type=float,
        default=None,
        help="give this fraction of frames a random detector mask, filled as predict() fills one (e.g. 0.5)",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP hidden layer sizes")
    p.add_argument(
        "--refine",
        choices=["strain", "tilts"],
        default=None,
        help="what the refining stage refines: tilts (the default: strain from the coarse stage, as "
        "in the shipped model) or strain (strain and tilts: better strain for thick films given the "
        "time, see README)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first member (each next one adds 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--library", default=None, help="library file for the paper recipe")
    _add_instrument(p)
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------ serve
def cmd_serve(args: argparse.Namespace) -> int:
    from .tiled.server import ServerConfig, run_server

    layout = {}
    for item in args.scan_dataset or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--scan-dataset wants NAME=PATH (e.g. frames=/entry/data/data), got {item!r}")
        layout[key] = value
    config = ServerConfig(
        data_dir=args.data_dir,
        library=args.library,
        lazy_library=not args.no_lazy_library,
        instrument=args.instrument,
        lazy_grid_points=args.grid,
        scans=args.scans,
        roi_center_px=tuple(args.roi_center) if args.roi_center else None,
        roi=args.roi,
        binning=args.binning,
        scan_layout=layout,
        readable=tuple(args.readable or ()),
        instruments=args.instruments,
        catalog_uri=args.catalog_uri,
        files_catalog_uri=args.files_catalog_uri,
        derived_catalog_uri=args.derived_catalog_uri,
        tables_uri=args.tables_uri,
        host=args.host,
        port=args.port,
        stream_cache=args.stream_cache,
        redis_sentinels=tuple(args.redis_sentinel or ()),
        redis_service=args.redis_service,
        start_redis=args.start_redis,
        stream_ttl_s=args.stream_ttl,
    )
    run_server(config, args.api_key, log_level="info" if args.verbose else "warning")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="start a Tiled server: writable run catalog, the library, a directory of scans",
        description="Start a Tiled server (loopback, API key) with a writable SQLite run catalog "
        "at /runs for TiledWriter, the derived runs at /derived, the library at /library, a "
        "library simulated on demand at /simulated and experimental scan files at /scans. The API "
        "key comes from --api-key, $NANOBEAM_TILED_API_KEY, or DATA_DIR/api_key (made on first start).",
    )
    p.add_argument("--data-dir", default="nanobeam-tiled", help="catalog, arrays, tables, config")
    p.add_argument("--library", default=None, help="library file to serve at /library")
    p.add_argument("--no-lazy-library", action="store_true", help="do not serve /simulated")
    p.add_argument("--grid", type=int, default=None, help="grid points of /simulated (default 41)")
    p.add_argument("--scans", default=None, help="directory of experimental scan files (/scans)")
    p.add_argument(
        "--roi-center",
        type=float,
        nargs=2,
        metavar=("ROW", "COL"),
        default=None,
        help="ROI centre on the scans' detector, raw pixels (default: from each file)",
    )
    p.add_argument("--roi", type=int, default=None, help="ROI side in raw pixels (default 128)")
    p.add_argument("--binning", type=int, default=None, help="ROI binning (default 2)")
    p.add_argument(
        "--scan-dataset",
        action="append",
        metavar="NAME=PATH",
        help="dataset path in the scan files: frames=, x_um=, y_um= (repeatable)",
    )
    p.add_argument(
        "--readable",
        action="append",
        metavar="DIR",
        help="another directory the catalogs may read (detector files; repeatable)",
    )
    p.add_argument(
        "--instruments",
        default=None,
        metavar="DIR",
        help="directory of instrument configs that catalog entries may name (instrument=NAME)",
    )
    p.add_argument(
        "--catalog-uri",
        default=None,
        help="run catalog database (default sqlite in DATA_DIR; postgresql://... )",
    )
    p.add_argument(
        "--files-catalog-uri",
        default=None,
        help="database of the /files catalog (default next to the run catalog)",
    )
    p.add_argument(
        "--derived-catalog-uri",
        default=None,
        help="database of the /derived catalog of derived runs (default next to the run catalog)",
    )
    p.add_argument(
        "--tables-uri",
        default=None,
        help="event-table storage (default sqlite in DATA_DIR; duckdb:///..., postgresql://...)",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=None, help="API key (prefer $NANOBEAM_TILED_API_KEY)")
    p.add_argument(
        "--stream-cache",
        default="memory",
        metavar="memory|redis://HOST:PORT/DB|none",
        help="where the run catalogs publish each write to live subscribers (nanobeam watch, the "
        "browser view): in this process (default), a Redis several server processes share, or off",
    )
    p.add_argument(
        "--redis-sentinel",
        action="append",
        metavar="HOST:PORT",
        help="a Redis Sentinel of the facility (repeatable; with --redis-service) for the stream cache",
    )
    p.add_argument("--redis-service", default=None, metavar="NAME", help="the primary the Sentinels monitor")
    p.add_argument(
        "--start-redis",
        action="store_true",
        help="start a local redis-server (Debian package) for the stream cache; it stops with the server",
    )
    p.add_argument(
        "--stream-ttl",
        type=int,
        default=3600,
        metavar="S",
        help="seconds the stream cache keeps a write for subscribers that reconnect (default 3600)",
    )
    p.add_argument("--verbose", action="store_true", help="log every request")
    _add_instrument(p)
    p.set_defaults(func=cmd_serve)


# ------------------------------------------------------------------ watch
def cmd_watch(args: argparse.Namespace) -> int:
    from .tiled.watch import watch_run

    watch_run(
        args.uri,
        api_key=args.api_key,
        run=args.run,
        follow=args.latest,
        plot=not args.no_plot,
        give_up_s=args.give_up,
    )
    return 0


def _add_watch(sub) -> None:
    p = sub.add_parser(
        "watch",
        help="follow a derived run live from any machine: progress and ε/ω/χ maps as rows arrive",
        description="Subscribe through Tiled's stream to the newest derived run (or --run UID) of the "
        "nanobeam serve at URI and show its progress and maps as its rows arrive; needs only the "
        "URI and the API key. It reconnects after a server restart and reads what it missed.",
    )
    p.add_argument("uri", help="the Tiled server, e.g. http://beamline-ws:8000 (or its /derived URI)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", default=None, metavar="UID", help="a derived run, or a raw run's uid")
    which.add_argument(
        "--latest", action="store_true", help="follow the newest run, and each new one after it ends"
    )
    p.add_argument("--api-key", default=None, help="the server's API key (or $NANOBEAM_TILED_API_KEY)")
    p.add_argument("--no-plot", action="store_true", help="progress lines only, no map window")
    p.add_argument(
        "--give-up",
        type=float,
        default=None,
        metavar="S",
        help="stop with an error when the server stays unreachable this long (default: keep trying)",
    )
    p.set_defaults(func=cmd_watch)


# ------------------------------------------------------------------ simulate-scan
def cmd_simulate_scan(args: argparse.Namespace) -> int:
    import time

    from .phantoms import fig3_phantom
    from .scanfile import simulate_scan_file

    instrument = _instrument(args.instrument)
    phantom = fig3_phantom(args.size, instrument=instrument, pixel_size_um=args.step_um)
    start = time.perf_counter()
    path = simulate_scan_file(
        args.out,
        phantom,
        instrument=instrument,
        max_counts=args.max_counts,
        detector_shape=(args.detector, args.detector),
        roi_center_px=tuple(args.roi_center) if args.roi_center else (args.detector / 2,) * 2,
        rng=args.seed,
        sample=args.sample,
    )
    print(
        f"wrote {args.size}x{args.size} raw frames of {args.detector}x{args.detector} pixels to "
        f"{path} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _add_simulate_scan(sub) -> None:
    p = sub.add_parser(
        "simulate-scan",
        help="write an example experimental scan file (HDF5, raw detector frames) from a phantom",
    )
    p.add_argument("--out", default="scans/simulated_scan.h5", help="output HDF5 file")
    p.add_argument("--size", type=int, default=16, help="scan points per side")
    p.add_argument("--step-um", type=float, default=0.05, help="stage step, micrometres")
    p.add_argument("--detector", type=int, default=256, help="detector side, raw pixels")
    p.add_argument(
        "--roi-center",
        type=float,
        nargs=2,
        metavar=("ROW", "COL"),
        default=None,
        help="centre of the reflection on the detector (default: detector centre)",
    )
    p.add_argument("--max-counts", type=float, default=7.0, help="counts at the Laue maximum")
    p.add_argument("--sample", default="simulated", help="sample name stored in the file")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson noise")
    _add_instrument(p)
    p.set_defaults(func=cmd_simulate_scan)


# ------------------------------------------------------------------ replay
def _predictor(model: str | None, device: str = "cpu"):
    from .inference import Predictor, load_pretrained

    if model:
        return Predictor.from_file(model, device=device)
    try:
        return load_pretrained(device=device)
    except FileNotFoundError as exc:
        raise InputError(f"{exc}; or give a model file with --model") from exc


def cmd_replay(args: argparse.Namespace) -> int:
    import numpy as np

    from .tiled.catalog import derived_catalog, open_catalog, tiled_writer
    from .tiled.replay import find_run, replay_run

    catalog = open_catalog(args.catalog, api_key=args.api_key)
    run = find_run(catalog, args.run)
    predictor = _predictor(args.model, args.device)
    derived = None if args.no_write else derived_catalog(catalog)
    subscribers = [] if derived is None else [tiled_writer(derived, batch_size=args.page_size)]
    result = replay_run(
        run,
        predictor,
        subscribers=subscribers,
        stream_name=args.stream,
        image_key=args.image_key,
        page_size=args.page_size,
        allow_instrument_mismatch=args.allow_instrument_mismatch,
        source=args.catalog,
        frames=args.frames,
    )
    data = result.data()
    flagged = int(np.count_nonzero(data["flag"])) if "flag" in data else 0
    where = "not written (--no-write)" if derived is None else f"written to {derived.uri}"
    print(
        f"replayed raw run {result.raw_uid}: {result.rows} frames in {result.seconds:.1f} s "
        f"with model {predictor.model_id} (sha256 {predictor.sha256[:12]}), {flagged} flagged"
    )
    print(
        f"derived run {result.derived_uid} {where}; find it with "
        f"derived.search(Key('parent_uid') == '{result.raw_uid}')"
    )
    stop = result.stop or {}
    if stop.get("exit_status") not in (None, "success"):
        print(f"derived run ended {stop['exit_status']}: {stop.get('reason', '')}", file=sys.stderr)
        return 1
    return 0


def _add_replay(sub) -> None:
    p = sub.add_parser(
        "replay",
        help="run a past raw run from Tiled through the model; store the derived run in Tiled",
        description="Read a raw run from Tiled (frames from its arrays), feed it through the "
        "NanobeamCallback and write the derived strain/tilt run to the derived-run catalog "
        "(/derived beside /runs on nanobeam serve), linked by parent_uid.",
    )
    p.add_argument(
        "catalog",
        help="tiled URI (http://127.0.0.1:8000 or .../api/v1/metadata/runs) "
        "or a tiled/databroker profile name",
    )
    p.add_argument("run", help="run uid, partial uid (>= 5 characters) or scan_id")
    p.add_argument("--model", default=None, help="model file (default: the shipped model)")
    p.add_argument(
        "--api-key", default=None, help="API key (default $TILED_API_KEY or $NANOBEAM_TILED_API_KEY)"
    )
    p.add_argument("--stream", default="primary", help="raw stream with the frames")
    p.add_argument("--image-key", default=None, help="frame data key (default: found by shape)")
    p.add_argument("--page-size", type=int, default=512, help="frames read and predicted at a time")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-write", action="store_true", help="analyse only; do not store the derived run")
    p.add_argument(
        "--frames",
        choices=("auto", "arrays", "documents"),
        default="auto",
        help="read the frames from the run's Tiled arrays (auto; over HTTP) or its documents() "
        "(detector files read here)",
    )
    p.add_argument(
        "--allow-instrument-mismatch",
        action="store_true",
        help="replay with a model trained for another instrument anyway (the physics check flags it)",
    )
    p.set_defaults(func=cmd_replay)


# ------------------------------------------------------------------ listen
def cmd_listen(args: argparse.Namespace) -> int:
    from .callbacks import listen

    predictor = _predictor(args.model, args.device)
    instrument = _instrument(args.instrument) if args.instrument else None
    store = None
    stored = ""
    if args.tiled:
        from .tiled.catalog import derived_catalog
        from .tiled.spool import SpooledTiledWriter

        derived = derived_catalog(args.tiled, api_key=args.api_key)
        store = SpooledTiledWriter(derived, args.spool)
        stored = f" and to Tiled {derived.uri} (spool {args.spool})"

    def ready() -> None:
        print(
            f"nanobeam listen: model {predictor.model_id} ({predictor.sha256[:12]}); raw documents from "
            f"{args.from_address}, derived runs to {args.to_address} (prefix {args.out_prefix!r})"
            f"{stored}; ready",
            flush=True,
        )

    callback = listen(
        predictor,
        args.from_address,
        args.to_address,
        in_prefix=args.in_prefix.encode(),
        out_prefix=args.out_prefix.encode(),
        maps_directory=args.maps,
        subscribers=[store] if store is not None else [],
        on_ready=ready,
        image_key=args.image_key,
        stream_name=args.stream,
        batch_size=args.batch_size,
        instrument=instrument,
        allow_instrument_mismatch=args.allow_instrument_mismatch,
    )
    s = callback.stats
    print(
        f"nanobeam listen: stopped after {s.rows_emitted} derived rows "
        f"(mean latency {s.mean_latency_s * 1e3:.1f} ms)",
        flush=True,
    )
    if store is not None and not store.close(timeout=60):
        print(
            f"nanobeam listen: Tiled has not taken every derived document yet; they are safe in "
            f"{args.spool} and are written by the next listener on that spool",
            flush=True,
        )
    return 0


def _add_listen(sub) -> None:
    p = sub.add_parser(
        "listen",
        help="analyse scans live from a 0MQ proxy and republish the derived strain/tilt runs",
        description="Subscribe to a bluesky-0MQ-proxy, run NanobeamNN on every frame, publish the "
        "derived runs back to the proxy with their own prefix. Start it before the scans.",
    )
    p.add_argument(
        "--from",
        dest="from_address",
        required=True,
        metavar="ADDRESS",
        help="the proxy's out-address, raw documents (e.g. tcp://127.0.0.1:5578)",
    )
    p.add_argument(
        "--to",
        dest="to_address",
        required=True,
        metavar="ADDRESS",
        help="the proxy's in-address, for the derived documents (e.g. tcp://127.0.0.1:5577)",
    )
    p.add_argument("--model", default=None, help="model file (default: the shipped pretrained model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--image-key", default=None, help="data key of the frames (default: found by shape)")
    p.add_argument("--stream", default="primary", help="raw stream with the frames")
    p.add_argument("--batch-size", type=int, default=1024, help="most frames per model call")
    p.add_argument("--in-prefix", default="", help="only analyse documents with this 0MQ prefix")
    p.add_argument("--out-prefix", default="nanobeam", help="0MQ prefix of the derived documents")
    p.add_argument("--maps", default=None, metavar="DIR", help="also save live map PNGs here")
    p.add_argument(
        "--tiled",
        default=None,
        metavar="CATALOG",
        help="also store the derived runs in Tiled: the run catalog's URI (http://HOST:8000, its "
        "derived runs go to /derived beside /runs) or a tiled/databroker profile name",
    )
    p.add_argument(
        "--api-key", default=None, help="Tiled API key (default $TILED_API_KEY or $NANOBEAM_TILED_API_KEY)"
    )
    p.add_argument(
        "--spool",
        default="nanobeam-listen-spool",
        metavar="DIR",
        help="local directory that holds derived documents until Tiled has them (with --tiled)",
    )
    p.add_argument(
        "--allow-instrument-mismatch",
        action="store_true",
        help="use the model even if the scan's instrument differs",
    )
    _add_instrument(p)
    p.set_defaults(func=cmd_listen)


# ------------------------------------------------------------------ fit
def _load_scan(path: str, dataset: str | None, roi_center: list[float] | None = None):
    """Frames (N, F, F) or a map (Y, X, F, F): from .npy (memory-mapped), an HDF5 dataset of
    such frames (read lazily), or any scan ``nanobeam predict`` reads (the ROI cut from whole
    detector frames; a complete raster as a map)."""
    from pathlib import Path

    import numpy as np

    if Path(path).suffix == ".npy":
        return np.load(path, mmap_mode="r")
    import h5py

    if h5py.is_hdf5(path):
        h5 = h5py.File(path, "r")  # open while the fit reads it lazily; closed at exit (see cmd_fit)
        name = dataset or "frames"
        if name in h5 and isinstance(h5[name], h5py.Dataset) and h5[name].shape[-1] in (64, 128):
            return h5[name]
        h5.close()
    from .physics import Instrument
    from .scans import open_scan

    source = open_scan(path, dataset=dataset)
    try:
        center = (roi_center[0], roi_center[1]) if roi_center else None
        read = source.roi_reader(Instrument().roi_pixels, center)
        frames = read(0, source.n_frames)
    finally:
        source.close()
    grid = source.positions
    if grid is not None and grid.row is not None and grid.col is not None and len(grid.shape) == 2:
        n_y, n_x = grid.shape
        row_major = np.array_equal(grid.row * n_x + grid.col, np.arange(source.n_frames))
        if row_major and source.n_frames == n_y * n_x:
            return frames.reshape(n_y, n_x, *frames.shape[1:])
    return frames


def cmd_fit(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .fitting import PARAMETERS, Library, make_fitter
    from .phantoms import fig3_phantom, simulate_scan

    instrument = _instrument(args.instrument)
    if args.library:
        library = Library.from_file(args.library)
    else:
        library = Library.from_instrument(instrument, args.grid, upsample=args.upsample)
    phantom = None
    data_instrument: Instrument | None
    if args.phantom is not None:
        phantom = fig3_phantom(args.phantom, instrument=library.instrument)
        frames = simulate_scan(
            phantom,
            library.instrument,
            args.max_counts,
            rng=args.seed,
            upsample=args.upsample,
            progress=not args.no_progress,
        )
        data_instrument = library.instrument
    else:
        frames = _load_scan(args.scan, args.dataset, args.roi_center)
        data_instrument = instrument if args.instrument else None
    options = {"chunk_size": args.chunk, "progress": not args.no_progress}
    if args.method == "ours":
        options["coarse_stride"] = args.coarse_stride
    start = time.perf_counter()
    fitter = make_fitter(args.method, library, **options)
    prepared = time.perf_counter()
    try:
        result = fitter.fit(frames, instrument=data_instrument)
    finally:
        if hasattr(frames, "file"):  # an h5py dataset: close its file
            frames.file.close()
    done = time.perf_counter()
    if phantom is not None:
        truth = phantom.to_dataset()
        result = result.assign_coords(x_um=truth.x_um, y_um=truth.y_um)
        for name in PARAMETERS:
            result[f"{name}_true"] = truth[name]
    result.attrs["command"] = "nanobeam " + " ".join(args.argv)
    from pathlib import Path

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_netcdf(out, engine="h5netcdf")
    n = int(np.prod(result.strain.shape))
    print(
        f"fitted {n} frames ({args.method}) in {done - prepared:.1f} s "
        f"(+{prepared - start:.1f} s library preparation); wrote {out}"
    )
    if phantom is not None:
        rmse = {
            p: float(np.sqrt(np.nanmean((result[p] - result[f"{p}_true"]).values ** 2))) for p in PARAMETERS
        }
        print("RMSE vs phantom: strain {strain:.3g}, omega {omega:.3g} deg, chi {chi:.3g} deg".format(**rmse))
    return 0


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit frames against the grid library (published method or ours)")
    lib = p.add_mutually_exclusive_group()
    lib.add_argument("--library", help="library file from `nanobeam simulate-library`")
    lib.add_argument(
        "--grid",
        type=int,
        default=None,
        help="simulate the library in memory with this many points per axis (default 41)",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--scan", help="frames (N, F, F) or a map (Y, X, F, F): .npy or HDF5")
    data.add_argument(
        "--phantom",
        type=int,
        metavar="SIZE",
        help="simulate the Fig. 3 phantom scan SIZE x SIZE and fit it (truth is saved too)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="HDF5 dataset holding the frames (default: 'frames', else found as nanobeam predict does)",
    )
    p.add_argument(
        "--roi-center",
        nargs=2,
        type=float,
        metavar=("ROW", "COL"),
        help="detector pixel of the central reflected ray, for whole detector frames (default: the file's)",
    )
    p.add_argument("--out", required=True, help="result file (netCDF/HDF5: .nc or .h5)")
    p.add_argument(
        "--method",
        choices=["faithful", "ours"],
        default="faithful",
        help="faithful: the published correlation fit; ours: likelihood + Laplace refinement",
    )
    p.add_argument("--chunk", type=int, default=None, help="frames per chunk (default: from free memory)")
    p.add_argument("--coarse-stride", type=int, default=2, help="ours: coarse search stride (1: full grid)")
    p.add_argument("--max-counts", type=float, default=7.0, help="phantom count level")
    p.add_argument("--seed", type=int, default=0, help="phantom noise seed")
    p.add_argument("--upsample", type=int, default=None, help="simulator sub-pixels (library and phantom)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_instrument(p)
    p.set_defaults(func=cmd_fit)


# ------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: a simulated fly scan analysed live, stored in Tiled, maps as pictures",
    )
    p.add_argument("--size", type=int, default=64, help="scan points per side (165: the seed's map)")
    p.add_argument("--out", default="nanobeam-output", help="directory for Tiled, detector files, PNGs")
    p.add_argument("--model", default=None, help="model file (default: the shipped ensemble)")
    p.add_argument("--exposure-ms", type=float, default=10.0, help="detector exposure per point, ms")
    p.add_argument(
        "--dead-time-ms", type=float, default=2.0, help="dead time between points (camera readout), ms"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the detector's Poisson noise")
    p.add_argument("--no-fit", action="store_true", help="skip the correlation fits")
    p.add_argument("--port", type=int, default=None, help="Tiled port (default: a free one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


# ------------------------------------------------------------------ predict
def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scans import predict_scan, read_positions, save_scan_maps, write_maps

    out = Path(args.out)
    if out.suffix.lower() not in (".nc", ".h5", ".hdf5", ".nc4"):
        raise InputError(f"--out {out}: name a NetCDF/HDF5 file (.nc or .h5)")
    source = _open_input(args)
    try:
        if args.positions:
            source.with_positions(read_positions(args.positions))
        predictor = _predictor(args.model)
        instrument = _instrument(args.instrument) if args.instrument else None
        maps = predict_scan(
            source,
            predictor,
            instrument=instrument,
            roi_center_px=tuple(args.roi_center) if args.roi_center else None,
            allow_instrument_mismatch=args.allow_instrument_mismatch,
            chunk_frames=args.chunk,
            progress=not args.no_progress,
            fit_film=not args.known_film,
            mask=_mask_file(args.mask) if args.mask else None,
        )
    finally:
        source.close()
    ds = maps.dataset
    ds.attrs["command"] = "nanobeam " + " ".join(args.argv)
    write_maps(ds, out)
    grid = " x ".join(str(n) for n in ds["strain"].shape)
    print(
        f"{maps.frames} frames of {source.name} -> {grid} maps in {maps.seconds:.1f} s "
        f"({maps.frames_per_s:,.0f} frames/s); wrote {out}"
    )
    if maps.flagged:
        print("flagged: " + ", ".join(f"{name} {count}" for name, count in maps.flagged.items()))
    if maps.problems:
        more = f" (and {len(maps.problems) - 1} more)" if len(maps.problems) > 1 else ""
        print(f"{len(maps.problems)} frames unreadable, flagged INVALID: {maps.problems[0]}{more}")
    if "strain_true" in ds:
        import numpy as np

        unflagged = ds["flag"].values == 0
        rmse = {
            p: float(np.sqrt(np.nanmean((ds[p].values - ds[f"{p}_true"].values)[unflagged] ** 2)))
            for p in ("strain", "omega", "chi")
        }
        print(
            "RMSE vs the file's truth (unflagged): strain {strain:.3g}, omega {omega:.3g} deg, "
            "chi {chi:.3g} deg".format(**rmse)
        )
    if args.png:
        png = save_scan_maps(ds, out.with_suffix(".png"), f"{source.name}: NanobeamNN maps")
        print(f"maps: {png}")
    return 0


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that read a scan (predict, check-orientation, calibrate, adapt)."""
    parser.add_argument(
        "--roi-center",
        nargs=2,
        type=float,
        metavar=("ROW", "COL"),
        help="detector pixel of the central reflected ray, to cut the 128 x 128 ROI from whole detector "
        "frames (default: the file's roi_center_px)",
    )
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--dataset", help="HDF5 dataset or Tiled key of the frames (default: found)")
    parser.add_argument("--api-key", default=None, help="Tiled API key (prefer $NANOBEAM_TILED_API_KEY)")
    _add_instrument(parser)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="turn a scan on disk (or in Tiled) into strain/omega/chi maps",
        description=(
            "Predict (strain, omega, chi) with errors and flags for every frame of a scan, and write "
            "the maps on the scan's grid (positions in um) to a NetCDF/HDF5 file. INPUT: one of our "
            "scan files, an areaDetector/NeXus HDF5 file (/entry/data/data), a directory of TIFF "
            "frames (one per point, in acquisition order) or a Tiled URI of a raw run "
            "(http://HOST:PORT/api/v1/metadata/runs/UID)."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="scan file, TIFF directory or Tiled URI")
    p.add_argument("--out", required=True, help="result file (.nc or .h5; read it with xarray.open_dataset)")
    p.add_argument(
        "--positions",
        metavar="FILE",
        help="the scan's positions and shape: a CSV with columns x_um,y_um (or _mm, _nm) or an APS "
        "sscan MDA file",
    )
    p.add_argument(
        "--png", action="store_true", help="also draw the maps, with units and colour bars (OUT.png)"
    )
    p.add_argument("--chunk", type=int, default=None, help="frames per chunk (default: ~64 MB of frames)")
    p.add_argument(
        "--mask",
        metavar="M.npy",
        help="more pixels to leave out: a bool .npy (True = masked), roi x roi in the detector's orientation "
        "(as calibrate --out-mask writes) or 64 x 64 binned",
    )
    p.add_argument(
        "--known-film",
        action="store_true",
        help="the film is the instrument's: do not fit it per frame (strain ~1.5x more precise when true; "
        "tested per frame and pooled)",
    )
    p.add_argument(
        "--allow-instrument-mismatch",
        action="store_true",
        help="use a model trained for another instrument anyway (results are flagged by the physics check)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(p)
    p.set_defaults(func=cmd_predict)


# ------------------------------------------------------------------ check-orientation
def _open_input(args: argparse.Namespace) -> Any:
    """The ScanSource of INPUT: a scan on disk, or a raw run's Tiled URI (with --api-key)."""
    from .scans import open_scan
    from .tiled.source import is_tiled_uri, open_tiled_run

    if is_tiled_uri(args.input):
        given = bool(getattr(args, "positions", None))
        return open_tiled_run(
            args.input, api_key=args.api_key, frame_key=args.dataset, with_positions=not given
        )
    return open_scan(args.input, dataset=args.dataset)


def cmd_check_orientation(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scans import check_orientation, read_spread, save_orientation_figure

    instrument = _instrument(args.instrument) if args.instrument else None
    predictor = _predictor(args.model)
    source = _open_input(args)
    try:
        roi = (instrument or source.instrument or predictor.instrument).roi_pixels
        center = (args.roi_center[0], args.roi_center[1]) if args.roi_center else None
        frames = read_spread(source, roi, center, args.frames)
    finally:
        source.close()
    report = check_orientation(frames, predictor, instrument or source.instrument, max_frames=len(frames))
    print(report.summary())
    out = Path(args.out or Path(args.input.rstrip("/")).name + "-orientation.png")
    print(f"picture: {save_orientation_figure(report, out)}")
    return 0


def _add_check_orientation(sub) -> None:
    p = sub.add_parser(
        "check-orientation",
        help="which of the 8 detector orientations (transpose, flips) fits a scan's frames",
        description=(
            "Read frames of a scan with each of the 8 detector orientations, analyse them with the "
            "physics check, and say which the physics fits (and which it cannot tell apart: see "
            "docs/physics.md, 'Detector orientation guide'). Draws each orientation's summed real "
            "frame beside the simulated one at the fitted parameters."
        ),
    )
    p.add_argument("input", metavar="SCAN", help="scan file, TIFF directory or Tiled URI of a raw run")
    p.add_argument("--out", help="PNG to write (default: SCAN-orientation.png here)")
    p.add_argument("--frames", type=int, default=256, help="frames to use, spread over the scan")
    _add_scan_options(p)
    p.set_defaults(func=cmd_check_orientation)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .inference import InstrumentMismatchError
    from .scans import calibrate

    if args.out_mask and not args.out_mask.endswith(".npy"):
        raise InputError(f"--out-mask {args.out_mask}: name a .npy file")
    base = _instrument(args.instrument) if args.instrument else None
    predictor = _predictor(args.model)
    source = _open_input(args)
    try:
        result = calibrate(
            source,
            predictor,
            base,
            roi_center_px=tuple(args.roi_center) if args.roi_center else None,
            min_frames=args.min_frames,
            max_frames=args.frames,
            assume_mean_tilt_zero=args.assume_mean_tilt_zero,
            progress=not args.no_progress,
        )
    finally:
        source.close()
    result.save(args.out_instrument, args.out_mask)
    print(result.summary())
    print(f"wrote {args.out_instrument}" + (f" and {args.out_mask}" if args.out_mask else ""))
    try:  # the same test predict applies: a film within a model's trained films is accepted
        predictor.check_instrument(result.instrument)
    except InstrumentMismatchError:
        print(
            f"the model was made for {predictor.instrument.film_thickness_angstrom:g} A: predict with "
            f"--instrument {args.out_instrument} --allow-instrument-mismatch (the physics check then "
            "uses the calibrated film)"
        )
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="estimate film thickness, hot/dead pixels, count scale and background from a scan",
        description=(
            "Estimate from a scan's own frames what the model takes as given: hot and dead pixels (per-pixel "
            "statistics over the scan), the film thickness (maximum likelihood over all frames at once), the "
            "count scale and background; write the calibrated instrument YAML that predict, the live "
            "callback and serve accept. The beam centre is not identifiable from a scan alone (see "
            "docs/physics.md); --assume-mean-tilt-zero estimates it under that stated assumption."
        ),
    )
    p.add_argument("input", metavar="SCAN", help="scan file, TIFF directory or Tiled URI of a raw run")
    p.add_argument("--out-instrument", required=True, help="calibrated instrument to write (.yaml or .json)")
    p.add_argument(
        "--out-mask",
        help="also write the mask of bad pixels (.npy, bool roi x roi, True = masked, detector orientation)",
    )
    p.add_argument(
        "--frames", type=int, default=4000, help="frames to use at most, spread over the scan (default 4000)"
    )
    p.add_argument(
        "--min-frames",
        type=int,
        default=100,
        help="frames with a measurable ring the calibration needs (default 100)",
    )
    p.add_argument(
        "--assume-mean-tilt-zero",
        action="store_true",
        help="estimate the beam-centre offset ASSUMING the scan's mean tilt (omega, chi) is zero",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(p)
    p.set_defaults(func=cmd_calibrate)


def _mask_file(path: str) -> Any:
    """A mask .npy as a bool array; a one-line error for a file that is not one."""
    import numpy as np

    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"--mask {path}: not a readable .npy array ({exc}); write one with numpy.save"
        ) from None
    if mask.ndim != 2 or mask.dtype.kind not in "bui":
        raise InputError(
            f"--mask {path}: a 2-D bool array is needed (True = masked), got {mask.dtype} {mask.shape}"
        )
    return mask.astype(bool)


def cmd_adapt(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from .scans import adapt_to_scan

    model = args.model
    if not model:
        from importlib import resources

        from .inference import PRETRAINED_FILE

        model = str(resources.files("nanobeam_bluesky") / "pretrained" / PRETRAINED_FILE)
    if "://" not in args.input and Path(args.out).resolve() == Path(args.input).resolve():
        raise InputError(f"--out {args.out} is the scan itself: name a new model file (.pt)")
    predictor = _predictor(args.model)
    source = _open_input(args)
    try:
        result = adapt_to_scan(
            source,
            predictor,
            model,
            args.out,
            _instrument(args.instrument) if args.instrument else None,
            roi_center_px=tuple(args.roi_center) if args.roi_center else None,
            max_frames=args.frames,
            steps=args.steps,
            seed=args.seed,
            progress=not args.no_progress,
            command="nanobeam " + " ".join(shlex.quote(a) for a in args.argv),
            scan=args.input if "://" in args.input else str(Path(args.input).resolve()),
        )
    finally:
        source.close()
    print(
        f"wrote {result.out} (sha256 {result.sha256[:12]}): {result.steps} steps on {result.frames} frames; "
        f"mean Poisson deviance per frame {result.loss_before:.1f} -> {result.loss_after:.1f}"
    )
    return 0


def _add_adapt(sub) -> None:
    p = sub.add_parser(
        "adapt",
        help="fine-tune a model to a scan's instrument on the scan's own (unlabelled) frames",
        description=(
            "Self-supervised fine-tuning: the loss is each frame's Poisson likelihood under the forward "
            "model of the scan's instrument at the network's prediction, mixed with simulated labelled "
            "frames of that instrument. For optics and films known only roughly (central stop, zone "
            "plate, detector distance, film thickness); another energy, reflection or detector needs "
            "`nanobeam train`. The input model is never overwritten; the new file records its parent's "
            "sha256, the scan and the loss before and after."
        ),
    )
    p.add_argument("input", metavar="SCAN", help="scan file, TIFF directory or Tiled URI of a raw run")
    p.add_argument("--out", required=True, help="adapted model file to write (.pt; not the input model)")
    p.add_argument(
        "--frames", type=int, default=4000, help="frames to use at most, spread over the scan (default 4000)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="optimiser steps, 128 scan + 128 simulated frames each (default 300)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the frame order and simulated frames")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scan_options(p)
    p.set_defaults(func=cmd_adapt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanobeam",
        description="Strain and tilt maps from scanning X-ray nanodiffraction, live in Bluesky.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (by default one line says what to fix)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo,
        _add_simulate_library,
        _add_train,
        _add_predict,
        _add_check_orientation,
        _add_calibrate,
        _add_adapt,
        _add_fit,
        _add_preview,
        _add_serve,
        _add_simulate_scan,
        _add_replay,
        _add_listen,
        _add_watch,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``nanobeam`` command. Errors the user can fix (:class:`~nanobeam_bluesky.errors.NanobeamError`,
    and files that cannot be read or written) print one line and return 2; anything else prints
    one line and returns 1; ``--debug`` shows the traceback instead."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (NanobeamError, OSError) as exc:
        if args.debug:
            raise
        # Configuration and data errors are the user's to fix: say what, not a traceback.
        print(f"nanobeam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"nanobeam {args.command}: unexpected error: {type(exc).__name__}: {exc} (run again with "
            "--debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
