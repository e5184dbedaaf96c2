"""The command line: one line per error the user can fix, tracebacks only with --debug."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from nanobeam_bluesky.cli import main
from nanobeam_bluesky.errors import InputError, NanobeamError
from nanobeam_bluesky.physics import InstrumentError


def test_a_bad_input_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("energy_kev: -3\n")
    args = ["preview", "--instrument", str(bad), "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "energy_kev must be a positive number" in err, err
    with pytest.raises(InstrumentError):
        main(["--debug", *args])
    missing = [
        "fit",
        "--scan",
        str(tmp_path / "nothing.npy"),
        "--out",
        str(tmp_path / "f.nc"),
        "--grid",
        "3",
        "--no-progress",
    ]
    assert main(missing) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_every_package_error_is_a_nanobeam_error_and_keeps_its_builtin():
    assert issubclass(InstrumentError, NanobeamError) and issubclass(InstrumentError, ValueError)
    assert issubclass(InputError, NanobeamError) and issubclass(InputError, ValueError)
    import nanobeam_bluesky.callbacks as callbacks

    assert issubclass(callbacks.StreamReadError, NanobeamError)
    assert issubclass(callbacks.StreamReadError, OSError)


def test_help_does_not_import_torch():
    code = (
        "import sys, nanobeam_bluesky.cli as c; c.build_parser(); "
        "print('torch' in sys.modules, 'xarray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanobeam_bluesky.cli", "--help"], capture_output=True, check=True)
    print(f"nanobeam --help: {time.perf_counter() - start:.2f} s")  # reported, not asserted
