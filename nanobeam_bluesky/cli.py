"""The ``nanobeam`` command line. Each sub-command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def _instrument(path: str | None):
    from .physics import Instrument

    return Instrument() if path is None else Instrument.load(path)


def _add_instrument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instrument", metavar="CONFIG", help="instrument YAML/JSON (default: physics.md table)"
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
    p.add_argument("--out", default="nanobeam-output/frames.png")
    p.add_argument("--max-counts", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    _add_instrument(p)
    p.set_defaults(func=cmd_preview)


# ------------------------------------------------------------------ train
def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from .training import RECIPES, train_ensemble

    recipe = RECIPES[args.recipe]
    changes = {k: v for k, v in {"epochs": args.epochs, "frames_per_epoch": args.frames_per_epoch,
                                 "pool_size": args.pool_size, "batch_size": args.batch_size}.items()
               if v is not None}
    if args.hidden:
        changes["architecture_kwargs"] = {"hidden": tuple(args.hidden)}
    recipe = recipe.replace(**changes)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    members = args.members if args.members is not None else (1 if recipe.name == "paper" else 4)
    command = "nanobeam train " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    sha, meta = train_ensemble(recipe, members, args.out, _instrument(args.instrument),
                               seed=args.seed, workdir=args.workdir, device=args.device,
                               library=args.library, command=command)
    ens = meta["metrics"]["ensemble"]
    print(f"wrote {args.out} ({members} members, sha256 {sha[:12]})")
    print("test RMSE: strain {rmse_strain:.3g}, omega {rmse_omega:.3g} deg, chi {rmse_chi:.3g} deg"
          .format(**ens))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an ensemble (paper or default recipe) into a model file")
    p.add_argument("--recipe", choices=["default", "paper"], default="default")
    p.add_argument("--members", type=int, default=None, help="ensemble size (default 4; paper 1)")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--workdir", default=None, help="checkpoints and metrics logs; resumes from it")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--frames-per-epoch", type=int, default=None)
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP hidden layer sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--library", default=None, help="library file for the paper recipe")
    _add_instrument(p)
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------ fit
def _load_scan(path: str, dataset: str):
    """Frames (N, F, F) or a map (Y, X, F, F) from .npy (memory-mapped) or HDF5 (read lazily)."""
    from pathlib import Path

    import numpy as np

    if Path(path).suffix == ".npy":
        return np.load(path, mmap_mode="r")
    import h5py

    h5 = h5py.File(path, "r")
    if dataset not in h5:
        names = [k for k in h5 if isinstance(h5[k], h5py.Dataset)]
        raise ValueError(f"{path} has no dataset {dataset!r} (it has {names}); name it with --dataset")
    return h5[dataset]


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
    if args.phantom is not None:
        phantom = fig3_phantom(args.phantom, instrument=library.instrument)
        frames = simulate_scan(phantom, library.instrument, args.max_counts, rng=args.seed,
                               upsample=args.upsample, progress=not args.no_progress)
        data_instrument = library.instrument
    else:
        frames = _load_scan(args.scan, args.dataset)
        data_instrument = instrument if args.instrument else None
    options = {"chunk_size": args.chunk, "progress": not args.no_progress}
    if args.method == "ours":
        options["coarse_stride"] = args.coarse_stride
    start = time.perf_counter()
    fitter = make_fitter(args.method, library, **options)
    prepared = time.perf_counter()
    result = fitter.fit(frames, instrument=data_instrument)
    done = time.perf_counter()
    if phantom is not None:
        truth = phantom.to_dataset()
        result = result.assign_coords(x_um=truth.x_um, y_um=truth.y_um)
        for name in PARAMETERS:
            result[f"{name}_true"] = truth[name]
    result.attrs["command"] = "nanobeam fit " + " ".join(sys.argv[2:])
    from pathlib import Path

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_netcdf(out, engine="h5netcdf")
    n = int(np.prod(result.strain.shape))
    print(f"fitted {n} frames ({args.method}) in {done - prepared:.1f} s "
          f"(+{prepared - start:.1f} s library preparation); wrote {out}")
    if phantom is not None:
        rmse = {p: float(np.sqrt(np.nanmean((result[p] - result[f"{p}_true"]).values ** 2)))
                for p in PARAMETERS}
        print("RMSE vs phantom: strain {strain:.3g}, omega {omega:.3g} deg, chi {chi:.3g} deg".format(**rmse))
    return 0


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit frames against the grid library (published method or ours)")
    lib = p.add_mutually_exclusive_group()
    lib.add_argument("--library", help="library file from `nanobeam simulate-library`")
    lib.add_argument("--grid", type=int, default=None,
                     help="simulate the library in memory with this many points per axis (default 41)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--scan", help="frames (N, F, F) or a map (Y, X, F, F): .npy or HDF5")
    data.add_argument("--phantom", type=int, metavar="SIZE",
                      help="simulate the Fig. 3 phantom scan SIZE x SIZE and fit it (truth is saved too)")
    p.add_argument("--dataset", default="frames", help="HDF5 dataset holding the frames")
    p.add_argument("--out", required=True, help="result file (netCDF/HDF5: .nc or .h5)")
    p.add_argument("--method", choices=["faithful", "ours"], default="faithful",
                   help="faithful: the published correlation fit; ours: likelihood + Laplace refinement")
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
    # The live fly-scan demo replaces this once the callback and Tiled parts exist.
    return cmd_preview(args)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: simulate frames and write a picture of them")
    p.add_argument("--out", default="nanobeam-output/frames.png")
    p.add_argument("--max-counts", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    _add_instrument(p)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanobeam",
        description="Strain and tilt maps from scanning X-ray nanodiffraction, live in Bluesky.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_simulate_library, _add_train, _add_fit, _add_preview):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # Configuration and data errors are the user's to fix: say what, not a traceback.
        print(f"nanobeam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
