"""How long `nanobeam --help` takes, beside the imports it avoids, in one run.

    python benchmarks/cli_help.py [--repeats 5]

Best of ``repeats`` fresh processes each: the interpreter alone, ``nanobeam --help`` (the package
imported lazily: no torch, xarray or tiled), and importing the inference module (what an eager
package ``__init__`` made every command pay). Goal: --help under 0.5 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def _best(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command")
    args = parser.parse_args()
    python = sys.executable
    rows = {
        "python -c pass (the interpreter)": [python, "-c", "pass"],
        "nanobeam --help": [python, "-m", "nanobeam_bluesky.cli", "--help"],
        "nanobeam predict --help": [python, "-m", "nanobeam_bluesky.cli", "predict", "--help"],
        "import nanobeam_bluesky.inference (torch, xarray)": [
            python,
            "-c",
            "import nanobeam_bluesky.inference",
        ],
    }
    times = {name: _best(cmd, args.repeats) for name, cmd in rows.items()}
    eager = times["import nanobeam_bluesky.inference (torch, xarray)"]
    for name, seconds in times.items():
        print(f"{name:52s} {seconds:6.2f} s   {seconds / eager:5.2f}x the eager import")
    verdict = "met" if times["nanobeam --help"] < 0.5 else "NOT met"
    print(f"goal: nanobeam --help < 0.5 s: {verdict}")


if __name__ == "__main__":
    main()
