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


# ------------------------------------------------------------------ listen
def cmd_listen(args: argparse.Namespace) -> int:
    from .callbacks import listen
    from .inference import Predictor, load_pretrained

    predictor = (Predictor.from_file(args.model, device=args.device) if args.model
                 else load_pretrained(device=args.device))
    instrument = _instrument(args.instrument) if args.instrument else None

    def ready() -> None:
        print(f"nanobeam listen: model {predictor.model_id} ({predictor.sha256[:12]}); raw documents from "
              f"{args.from_address}, derived runs to {args.to_address} (prefix {args.out_prefix!r}); ready",
              flush=True)

    callback = listen(
        predictor, args.from_address, args.to_address,
        in_prefix=args.in_prefix.encode(), out_prefix=args.out_prefix.encode(),
        maps_directory=args.maps, on_ready=ready, image_key=args.image_key,
        stream_name=args.stream, batch_size=args.batch_size, instrument=instrument,
        allow_instrument_mismatch=args.allow_instrument_mismatch,
    )
    s = callback.stats
    print(f"nanobeam listen: stopped after {s.rows_emitted} derived rows "
          f"(mean latency {s.mean_latency_s * 1e3:.1f} ms)", flush=True)
    return 0


def _add_listen(sub) -> None:
    p = sub.add_parser(
        "listen",
        help="analyse scans live from a 0MQ proxy and republish the derived strain/tilt runs",
        description="Subscribe to a bluesky-0MQ-proxy, run NanobeamNN on every frame, publish the "
        "derived runs back to the proxy with their own prefix. Start it before the scans.",
    )
    p.add_argument("--from", dest="from_address", required=True, metavar="ADDRESS",
                   help="the proxy's out-address, raw documents (e.g. tcp://127.0.0.1:5578)")
    p.add_argument("--to", dest="to_address", required=True, metavar="ADDRESS",
                   help="the proxy's in-address, for the derived documents (e.g. tcp://127.0.0.1:5577)")
    p.add_argument("--model", default=None, help="model file (default: the shipped pretrained model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--image-key", default=None, help="data key of the frames (default: found by shape)")
    p.add_argument("--stream", default="primary", help="raw stream with the frames")
    p.add_argument("--batch-size", type=int, default=1024, help="most frames per model call")
    p.add_argument("--in-prefix", default="", help="only analyse documents with this 0MQ prefix")
    p.add_argument("--out-prefix", default="nanobeam", help="0MQ prefix of the derived documents")
    p.add_argument("--maps", default=None, metavar="DIR", help="also save live map PNGs here")
    p.add_argument("--allow-instrument-mismatch", action="store_true",
                   help="use the model even if the scan's instrument differs")
    _add_instrument(p)
    p.set_defaults(func=cmd_listen)


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
    for add in (_add_demo, _add_simulate_library, _add_train, _add_preview, _add_listen):
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
