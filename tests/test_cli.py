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


def _our_lines(err: str) -> list[str]:
    """stderr lines of ours (tiled's client may add a "Retrying…" line while it retries)."""
    return [line for line in err.strip().splitlines() if line.startswith("nanobeam ")]


@pytest.mark.unit
def test_every_option_of_every_command_has_help_text():
    import argparse

    from nanobeam_bluesky.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing
    assert {"predict", "fit", "serve", "replay", "demo"} <= set(commands)


@pytest.mark.unit
def test_instrument_yaml_reads_numbers_as_yaml_1_2_and_refuses_what_is_ambiguous(tmp_path, capsys):
    from nanobeam_bluesky.physics import Instrument

    inst = Instrument.from_yaml("energy_kev: 1.04e1\nlattice_c_angstrom: 3.9e0\ndetector_pixel_m: 55e-6\n")
    assert inst.energy_kev == 10.4 and inst.lattice_c_angstrom == 3.9 and inst.detector_pixel_m == 55e-6
    for text, message in (
        ("", "the instrument config is empty"),
        ("# only a comment\n", "the instrument config is empty"),
        ("detector_flip_rows: 'true'\n", "detector_flip_rows must be true or false (without quotes)"),
        ('energy_kev: "10.4"\n', "energy_kev must be a positive number (write it without quotes)"),
        ("energy_kev: true\n", "energy_kev must be a positive number"),
    ):
        path = tmp_path / "inst.yaml"
        path.write_text(text)
        assert main(["preview", "--instrument", str(path), "--out", str(tmp_path / "x.png")]) == 2
        (line,) = _our_lines(capsys.readouterr().err)
        assert message in line, line


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--data-dir", str(tmp_path / "srv"), "--port", str(port)]) == 2
    (line,) = _our_lines(capsys.readouterr().err)
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line
    assert not (tmp_path / "srv" / "config.yml").exists()  # refused before writing anything


def test_a_server_that_is_not_there_is_one_line(tmp_path, capsys):
    from nanobeam_bluesky.tiled.server import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["replay", uri, "abcdef"]) == 2
    (line,) = _our_lines(capsys.readouterr().err)
    assert f"no Tiled server answers at {uri}" in line and "nanobeam serve" in line
