"""APS sscan MDA files: the byte layout of the format description, round trips of 1-D and 2-D scans
in versions 1.3 and 1.4, aborted scans, units, and one-line errors for files that cannot be read."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from nanobeam_bluesky.errors import InputError
from nanobeam_bluesky.formats import (
    DBR_CTRL_CHAR,
    DBR_CTRL_DOUBLE,
    DBR_CTRL_FLOAT,
    DBR_CTRL_LONG,
    DBR_CTRL_SHORT,
    DBR_STRING,
    MdaDetector,
    MdaExtraPvInfo,
    MdaFile,
    MdaPositioner,
    MdaScan,
    MdaTrigger,
    mda_positions,
    read_mda,
    write_mda,
)

pytestmark = pytest.mark.unit

VERSIONS = [1.3, 1.4]


def _pos(
    number: int, name: str, values: object, unit: str = "mm", desc: str = "", readback_unit: str | None = None
) -> MdaPositioner:
    return MdaPositioner(
        number=number,
        name=f"{name}.VAL",
        description=desc or f"{name} stage",
        units=unit,
        readback_name=f"{name}.RBV",
        readback_description=f"{name} readback",
        readback_units=unit if readback_unit is None else readback_unit,
        values=np.asarray(values, dtype=np.float64),
    )


def _det(number: int, name: str, values: object, unit: str = "cts") -> MdaDetector:
    return MdaDetector(
        number=number,
        name=name,
        description=f"{name} counts",
        units=unit,
        values=np.asarray(values, dtype=np.float32),
    )


def _scan_1d(n: int = 11, cpt: int | None = None, unit: str = "mm") -> MdaFile:
    cpt = n if cpt is None else cpt
    x = np.linspace(-0.5, 0.5, n)[:cpt]
    scan = MdaScan(
        rank=1,
        requested_points=n,
        current_point=cpt,
        positioners=[_pos(0, "26idcnpi:m17", x, unit), _pos(1, "26idcnpi:m18", 2 * x, unit)],
        detectors=[
            _det(0, "26idc:3820:scaler1.S3", 100 + np.arange(cpt)),
            _det(5, "26idcXMAP:mca8.R0", np.sqrt(np.arange(cpt))),
        ],
        name="26idbSOFT:scan1",
        time_stamp="MAY 04, 2024 10:21:07.123",
        triggers=[MdaTrigger(0, "26idc:3820:scaler1.CNT", 1.0)],
    )
    return MdaFile(
        version=1.4,
        scan_number=1234,
        rank=1,
        dimensions=(n,),
        scan=scan,
        extra_pvs={
            "26idc:energy": 10.4,
            "26idc:sample": "LaAlO3 film",
            "26idc:counts": np.array([1, 2, 3], dtype=np.int32),
        },
        extra_pv_info={"26idc:energy": MdaExtraPvInfo("energy", "keV", DBR_CTRL_DOUBLE, 1)},
    )


def _row(r: int, nx: int, cpt: int, x_unit: str) -> MdaScan:
    x = 10.0 + 0.25 * np.arange(nx)[:cpt]  # µm, or whatever x_unit says
    return MdaScan(
        rank=1,
        requested_points=nx,
        current_point=cpt,
        positioners=[_pos(0, "26idcnpi:m17", x, x_unit)],
        detectors=[_det(0, "26idc:3820:scaler1.S3", 1000 * r + np.arange(cpt))],
        name="26idbSOFT:scan1",
        time_stamp=f"row {r}",
    )


def _scan_2d(
    ny: int = 4,
    nx: int = 5,
    rows_done: int | None = None,
    partial: int = 0,
    x_unit: str = "um",
    y_unit: str = "um",
) -> MdaFile:
    """ny x nx requested; ``rows_done`` finished rows, then (when ``partial``) one row with that many points.

    As saveData records an aborted scan: the outer point (y readback) of a row is recorded only when
    that row has finished.
    """
    rows_done = ny if rows_done is None else rows_done
    y = -3.0 + 0.5 * np.arange(rows_done)
    inner = [_row(r, nx, nx, x_unit) for r in range(rows_done)]
    if partial:
        inner.append(_row(rows_done, nx, partial, x_unit))
    outer = MdaScan(
        rank=2,
        requested_points=ny,
        current_point=rows_done,
        positioners=[_pos(0, "26idcnpi:m18", y, y_unit)],
        detectors=[_det(0, "26idc:ring_current", np.full(rows_done, 101.5), "mA")],
        inner=inner,
        name="26idbSOFT:scan2",
        time_stamp="MAY 04, 2024 11:00:00.000",
        triggers=[MdaTrigger(0, "26idbSOFT:scan1.EXSC", 1.0)],
    )
    return MdaFile(
        version=1.4,
        scan_number=77,
        rank=2,
        dimensions=(ny, nx),
        scan=outer,
        is_regular=partial == 0 and rows_done == ny,
        extra_pvs={
            "26idc:string": "beam on",
            "26idc:char": "a long file name.h5",
            "26idc:short": np.array([-2, 7], dtype=np.int32),
            "26idc:long": 123456,
            "26idc:float": np.array([0.5, 1.5], dtype=np.float32),
            "26idc:double": np.array([1e-9, 2.5, -3.0]),
        },
        extra_pv_info={
            "26idc:string": MdaExtraPvInfo("a string", "", DBR_STRING, 1),
            "26idc:char": MdaExtraPvInfo("a char array", "", DBR_CTRL_CHAR, 0),
            "26idc:short": MdaExtraPvInfo("shorts", "counts", DBR_CTRL_SHORT, 2),
            "26idc:long": MdaExtraPvInfo("a long", "steps", DBR_CTRL_LONG, 1),
            "26idc:float": MdaExtraPvInfo("floats", "mm", DBR_CTRL_FLOAT, 2),
            "26idc:double": MdaExtraPvInfo("doubles", "s", DBR_CTRL_DOUBLE, 3),
        },
    )


def _one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        read_mda(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


# --- the byte layout, assembled by hand from the format description -------------------------------


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _s(text: str) -> bytes:
    raw = text.encode()
    return _i(len(raw)) + (_i(len(raw)) + raw + b"\0" * (-len(raw) % 4) if raw else b"")


def test_writer_bytes_follow_the_format_description(workdir: Path) -> None:
    """A 1-D scan of 3 requested points (2 acquired): header, scan, extra PVs, byte for byte."""
    scan = MdaScan(
        rank=1,
        requested_points=3,
        current_point=2,
        positioners=[
            MdaPositioner(
                0, "m1.VAL", "x", "mm", "m1.RBV", "", "mm", np.array([1.0, 2.0]), step_mode="LINEAR"
            )
        ],
        detectors=[MdaDetector(2, "det", "", "cts", np.array([5.0, 6.0], dtype=np.float32))],
        name="ioc:scan1",
        time_stamp="now",
        triggers=[MdaTrigger(0, "t", 1.0)],
    )
    mda = MdaFile(
        version=1.3,
        scan_number=9,
        rank=1,
        dimensions=(3,),
        scan=scan,
        extra_pvs={"pv:s": "ab", "pv:d": 2.5},
        extra_pv_info={"pv:d": MdaExtraPvInfo("", "eV", DBR_CTRL_DOUBLE, 1)},
    )
    body = (
        _i(1)
        + _i(3)
        + _i(2)
        + _s("ioc:scan1")
        + _s("now")
        + _i(1)
        + _i(1)
        + _i(1)
        + _i(0)
        + _s("m1.VAL")
        + _s("x")
        + _s("LINEAR")
        + _s("mm")
        + _s("m1.RBV")
        + _s("")
        + _s("mm")
        + _i(2)
        + _s("det")
        + _s("")
        + _s("cts")
        + _i(0)
        + _s("t")
        + struct.pack(">f", 1.0)
        + struct.pack(">3d", 1.0, 2.0, 0.0)
        + struct.pack(">3f", 5.0, 6.0, 0.0)
    )
    header_size = 4 + 4 + 4 + 4 + 4 + 4
    extras = (
        _i(2)
        + _s("pv:s")
        + _s("")
        + _i(DBR_STRING)
        + _s("ab")
        + _s("pv:d")
        + _s("")
        + _i(DBR_CTRL_DOUBLE)
        + _i(1)
        + _s("eV")
        + struct.pack(">d", 2.5)
    )
    expected = (
        bytes.fromhex("3FA66666")
        + _i(9)
        + _i(1)
        + _i(3)
        + _i(1)
        + _i(header_size + len(body))
        + body
        + extras
    )

    path = write_mda(workdir / "tiny.mda", mda)
    assert path.read_bytes() == expected
    back = read_mda(path)
    assert back.version == pytest.approx(1.3)
    assert back.scan.positioners[0].values.tolist() == [1.0, 2.0]
    assert back.scan.detectors[0].number == 2
    assert back.extra_pvs == {"pv:s": "ab", "pv:d": 2.5}
    # 1.4 differs only in the version number.
    assert write_mda(workdir / "v14.mda", mda, version=1.4).read_bytes()[:4] == bytes.fromhex("3FB33333")
    assert (workdir / "v14.mda").read_bytes()[4:] == expected[4:]


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_1d_round_trip(workdir: Path, version: float) -> None:
    original = _scan_1d()
    mda = read_mda(write_mda(workdir / "scan_1234.mda", original, version=version))

    assert mda.version == pytest.approx(version)
    assert (mda.scan_number, mda.rank, mda.dimensions) == (1234, 1, (11,))
    assert mda.source == str(workdir / "scan_1234.mda")
    scan = mda.scan
    assert (scan.rank, scan.requested_points, scan.current_point) == (1, 11, 11)
    assert (scan.name, scan.time_stamp) == ("26idbSOFT:scan1", "MAY 04, 2024 10:21:07.123")
    p = scan.positioners[0]
    assert (p.number, p.name, p.description, p.units) == (0, "26idcnpi:m17.VAL", "26idcnpi:m17 stage", "mm")
    assert (p.readback_name, p.readback_description, p.readback_units) == (
        "26idcnpi:m17.RBV",
        "26idcnpi:m17 readback",
        "mm",
    )
    assert p.step_mode == "LINEAR"
    np.testing.assert_allclose(p.values, np.linspace(-0.5, 0.5, 11), rtol=0, atol=1e-15)
    assert [d.number for d in scan.detectors] == [0, 5]
    assert scan.detectors[1].values.dtype == np.float32
    np.testing.assert_allclose(scan.detectors[1].values, np.sqrt(np.arange(11)), rtol=1e-6)
    assert scan.triggers == [MdaTrigger(0, "26idc:3820:scaler1.CNT", 1.0)]
    assert mda.extra_pvs["26idc:energy"] == pytest.approx(10.4)
    assert mda.extra_pv_info["26idc:energy"] == MdaExtraPvInfo("energy", "keV", DBR_CTRL_DOUBLE, 1)
    assert mda.extra_pvs["26idc:sample"] == "LaAlO3 film"
    assert mda.extra_pvs["26idc:counts"].tolist() == [1, 2, 3]
    assert mda.extra_pv_info["26idc:counts"].dbr_type == DBR_CTRL_LONG

    pos = mda_positions(mda)
    assert pos.shape == (11,) and pos.requested_shape == (11,) and pos.complete
    np.testing.assert_allclose(pos.x_um, np.linspace(-500.0, 500.0, 11), rtol=0, atol=1e-9)
    assert pos.y_um.tolist() == [0.0] * 11  # a 1-D scan has no y unless one is named
    assert pos.names == ("26idcnpi:m17.VAL", None)
    assert pos.units == ("µm", "") and pos.file_units == ("mm", "")
    assert pos.col.tolist() == list(range(11)) and pos.row.tolist() == [0] * 11
    assert pos.scan_number == 1234

    named = mda_positions(mda, y="26idcnpi:m18")  # the PV without its field
    np.testing.assert_allclose(named.y_um, np.linspace(-1000.0, 1000.0, 11), rtol=0, atol=1e-9)
    assert named.names == ("26idcnpi:m17.VAL", "26idcnpi:m18.VAL")


@pytest.mark.parametrize("version", VERSIONS)
def test_2d_round_trip(workdir: Path, version: float) -> None:
    mda = read_mda(write_mda(workdir / "scan_0077.mda", _scan_2d(ny=4, nx=5), version=version))

    assert mda.version == pytest.approx(version)
    assert (mda.rank, mda.dimensions, mda.scan_number, mda.is_regular) == (2, (4, 5), 77, True)
    outer = mda.scan
    assert (outer.rank, outer.requested_points, outer.current_point, len(outer.inner)) == (2, 4, 4, 4)
    assert outer.name == "26idbSOFT:scan2" and outer.detectors[0].units == "mA"
    np.testing.assert_allclose(outer.positioners[0].values, [-3.0, -2.5, -2.0, -1.5])
    for r, row in enumerate(outer.inner):
        assert (row.rank, row.requested_points, row.current_point, row.time_stamp) == (1, 5, 5, f"row {r}")
        np.testing.assert_allclose(row.detectors[0].values, 1000 * r + np.arange(5))
    assert mda.extra_pvs["26idc:string"] == "beam on"
    assert mda.extra_pvs["26idc:char"] == "a long file name.h5"
    assert mda.extra_pvs["26idc:short"].tolist() == [-2, 7]
    assert mda.extra_pvs["26idc:long"] == 123456
    np.testing.assert_allclose(mda.extra_pvs["26idc:float"], [0.5, 1.5])
    np.testing.assert_allclose(mda.extra_pvs["26idc:double"], [1e-9, 2.5, -3.0], rtol=1e-15)
    assert {k: (v.description, v.units, v.dbr_type) for k, v in mda.extra_pv_info.items()} == {
        "26idc:string": ("a string", "", DBR_STRING),
        "26idc:char": ("a char array", "", DBR_CTRL_CHAR),
        "26idc:short": ("shorts", "counts", DBR_CTRL_SHORT),
        "26idc:long": ("a long", "steps", DBR_CTRL_LONG),
        "26idc:float": ("floats", "mm", DBR_CTRL_FLOAT),
        "26idc:double": ("doubles", "s", DBR_CTRL_DOUBLE),
    }

    pos = mda_positions(mda)
    assert pos.shape == (4, 5) and pos.n_points == 20 and pos.complete and pos.estimated_rows == ()
    assert pos.names == ("26idcnpi:m17.VAL", "26idcnpi:m18.VAL") and pos.units == ("µm", "µm")
    grid_y, grid_x = np.meshgrid(-3.0 + 0.5 * np.arange(4), 10.0 + 0.25 * np.arange(5), indexing="ij")
    np.testing.assert_allclose(pos.x_um.reshape(pos.shape), grid_x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pos.y_um.reshape(pos.shape), grid_y, rtol=0, atol=1e-12)
    assert pos.row.tolist() == [r for r in range(4) for _ in range(5)]
    assert pos.col.tolist() == list(range(5)) * 4

    # Swapped axes by description and readback name: x is then the outer positioner.
    swapped = mda_positions(mda, x="26idcnpi:m18 stage", y="26idcnpi:m17.RBV")
    np.testing.assert_allclose(swapped.x_um, pos.y_um)
    np.testing.assert_allclose(swapped.y_um, pos.x_um)


def test_writer_and_reader_round_trip_the_dataclasses(workdir: Path) -> None:
    original = _scan_2d(ny=3, nx=4, rows_done=2, partial=1)
    back = read_mda(write_mda(workdir / "a.mda", original))
    again = workdir / "b.mda"
    write_mda(again, back)
    assert again.read_bytes() == (workdir / "a.mda").read_bytes()


# --- aborted scans ----------------------------------------------------------------------------------


def test_aborted_2d_scan_keeps_the_partial_row(workdir: Path) -> None:
    """6 x 5 requested; 3 rows finished, the 4th stopped after 2 points: 17 points on 4 rows."""
    mda = read_mda(write_mda(workdir / "aborted.mda", _scan_2d(ny=6, nx=5, rows_done=3, partial=2)))
    assert (mda.scan.requested_points, mda.scan.current_point, len(mda.scan.inner)) == (6, 3, 4)
    assert [s.current_point for s in mda.scan.inner] == [5, 5, 5, 2]
    assert not mda.is_regular

    pos = mda_positions(mda)
    assert pos.shape == (4, 5) and pos.requested_shape == (6, 5)
    assert pos.n_points == 17 and not pos.complete
    assert pos.row.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 2
    assert pos.col.tolist() == list(range(5)) * 3 + [0, 1]
    np.testing.assert_allclose(pos.x_um[-2:], [10.0, 10.25], rtol=0, atol=1e-12)
    # The running row's y was not recorded: one step (0.5 µm) on from the finished rows.
    np.testing.assert_allclose(pos.y_um[-2:], [-1.5, -1.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pos.y_um[:15], np.repeat([-3.0, -2.5, -2.0], 5), rtol=0, atol=1e-12)
    assert pos.estimated_rows == (3,)


def test_aborted_2d_scan_with_one_finished_row_drops_the_running_row(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mda = read_mda(write_mda(workdir / "short.mda", _scan_2d(ny=6, nx=5, rows_done=1, partial=3)))
    with caplog.at_level(logging.WARNING, logger="nanobeam_bluesky.formats._mda"):
        pos = mda_positions(mda)
    assert pos.shape == (1, 5) and pos.n_points == 5
    np.testing.assert_allclose(pos.y_um, [-3.0] * 5)
    assert "row 2" in caplog.text and "left out" in caplog.text
    # With x and y both taken from the inner scan, the running row needs no outer value and stays.
    both_inner = mda_positions(mda, y="26idcnpi:m17")
    assert both_inner.shape == (2, 5) and both_inner.n_points == 8

    nothing = read_mda(write_mda(workdir / "none.mda", _scan_2d(ny=6, nx=5, rows_done=0, partial=3)))
    with pytest.raises(InputError, match="finished no row"):
        mda_positions(nothing)


def test_aborted_1d_scan(workdir: Path) -> None:
    mda = read_mda(write_mda(workdir / "a1.mda", _scan_1d(n=11, cpt=4, unit="um")))
    assert (mda.scan.requested_points, mda.scan.current_point) == (11, 4)
    assert mda.scan.positioners[0].values.size == 4 and mda.scan.detectors[0].values.size == 4
    pos = mda_positions(mda)
    assert pos.shape == (4,) and pos.requested_shape == (11,) and not pos.complete
    np.testing.assert_allclose(pos.x_um, [-0.5, -0.4, -0.3, -0.2], rtol=0, atol=1e-12)


# --- units and positioner choice -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "factor", "reported"),
    [
        ("mm", 1000.0, "µm"),
        ("MM", 1000.0, "µm"),
        ("nm", 1e-3, "µm"),
        ("um", 1.0, "µm"),
        ("µm", 1.0, "µm"),
        ("microns", 1.0, "µm"),
        ("deg", 1.0, "deg"),
        ("", 1.0, ""),
    ],
)
def test_units_convert_to_micrometres(workdir: Path, unit: str, factor: float, reported: str) -> None:
    mda = read_mda(write_mda(workdir / "u.mda", _scan_2d(ny=2, nx=3, x_unit=unit, y_unit="nm")))
    pos = mda_positions(mda)
    np.testing.assert_allclose(pos.x_um[:3], (10.0 + 0.25 * np.arange(3)) * factor, rtol=1e-12)
    np.testing.assert_allclose(pos.y_um[::3], [-3e-3, -2.5e-3], rtol=1e-12)
    assert pos.units == (reported, "µm") and pos.file_units == (unit, "nm")


def test_readback_unit_wins_and_positioner_unit_is_the_fallback(workdir: Path) -> None:
    mda = _scan_1d(n=3, unit="mm")
    mda.scan.positioners[0].readback_units = "nm"
    mda.scan.positioners[1].readback_units = ""
    back = read_mda(write_mda(workdir / "rb.mda", mda))
    pos = mda_positions(back, y="26idcnpi:m18.VAL")
    np.testing.assert_allclose(pos.x_um, [-5e-4, 0.0, 5e-4], rtol=0, atol=1e-15)
    np.testing.assert_allclose(pos.y_um, [-1000.0, 0.0, 1000.0], rtol=0, atol=1e-9)
    assert pos.file_units == ("nm", "mm")


def test_unknown_positioner_name_lists_the_positioners(workdir: Path) -> None:
    mda = read_mda(write_mda(workdir / "n.mda", _scan_2d(ny=2, nx=2)))
    with pytest.raises(InputError) as info:
        mda_positions(mda, x="26idcnpi:m99")
    message = str(info.value)
    assert "\n" not in message and "'26idcnpi:m99'" in message
    assert "26idcnpi:m17.VAL" in message and "26idcnpi:m18.VAL" in message and "x=" in message


# --- files that cannot be read ------------------------------------------------------------------------


def test_truncated_files_are_one_line_input_errors(workdir: Path) -> None:
    path = write_mda(workdir / "full.mda", _scan_2d(ny=4, nx=5))
    data = path.read_bytes()
    mda = read_mda(path)
    assert mda.scan.current_point == 4

    cut = workdir / "cut.mda"
    # In the data of the 3rd row; the offsets table (after the 28-byte header and the outer scan's
    # rank, NPTS and CPT) says where it starts.
    third_row = struct.unpack(">4i", data[40:56])[2]
    cut.write_bytes(data[: third_row + 200])
    message = _one_line_error(cut, f"truncated at byte {third_row + 200}", "inner scan of row 3 (of 4)")
    assert "copy it again" in message

    cut.write_bytes(data[:10])
    _one_line_error(cut, "truncated at byte 10", "the file header")
    cut.write_bytes(data[:60])
    _one_line_error(cut, "truncated at byte 60", "the outer scan")
    cut.write_bytes(data[:-3])
    _one_line_error(cut, f"truncated at byte {len(data) - 3}", "the extra PVs")


def test_files_of_another_kind_are_refused(workdir: Path) -> None:
    h5 = workdir / "scan.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.arange(3)
    _one_line_error(h5, "not an MDA file", "HDF5")

    text = workdir / "positions.txt"
    text.write_text("x_um y_um\n0.0 0.0\n0.1 0.0\n")
    _one_line_error(text, "not an MDA file", "text file")

    empty = workdir / "empty.mda"
    empty.write_bytes(b"")
    _one_line_error(empty, "not an MDA file")

    noise = workdir / "noise.mda"
    noise.write_bytes(np.random.default_rng(0).integers(128, 256, 256, dtype=np.uint8).tobytes())
    _one_line_error(noise, "not an MDA file")


def test_other_versions_are_refused(workdir: Path) -> None:
    data = bytearray(write_mda(workdir / "ok.mda", _scan_1d()).read_bytes())
    data[:4] = struct.pack(">f", 1.2)
    old = workdir / "old.mda"
    old.write_bytes(bytes(data))
    _one_line_error(old, "version 1.2 is not supported", "1.3 and 1.4")
    with pytest.raises(InputError, match=r"1\.3 or 1\.4"):
        write_mda(workdir / "new.mda", _scan_1d(), version=1.5)


def test_rank_3_is_refused(workdir: Path) -> None:
    """The writer makes any rank; the reader takes 1-D and 2-D only."""
    inner_2d = _scan_2d(ny=2, nx=3).scan
    outer = MdaScan(
        rank=3,
        requested_points=2,
        current_point=2,
        positioners=[_pos(0, "26idcnpi:m19", [0.0, 1.0])],
        inner=[inner_2d, inner_2d],
    )
    path = write_mda(
        workdir / "cube.mda", MdaFile(version=1.4, scan_number=5, rank=3, dimensions=(2, 2, 3), scan=outer)
    )
    assert struct.unpack(">i", path.read_bytes()[8:12]) == (3,)
    _one_line_error(path, "3-D scan", "only 1-D and 2-D")


def test_corrupt_counts_are_one_line_input_errors(workdir: Path) -> None:
    data = bytearray(write_mda(workdir / "ok.mda", _scan_1d(n=3)).read_bytes())
    # Header (24 bytes) + rank, npts, cpt; then the scan name and time stamp: the positioner count.
    at = 24 + 12 + len(_s("26idbSOFT:scan1")) + len(_s("MAY 04, 2024 10:21:07.123"))
    assert struct.unpack(">i", data[at : at + 4]) == (2,)
    data[at : at + 4] = _i(123456789)
    bad = workdir / "bad.mda"
    bad.write_bytes(bytes(data))
    _one_line_error(bad, "corrupt MDA file", f"a number of positioners of 123456789 at byte {at}", "the scan")


def test_an_undescribed_extra_pv_type_stops_the_extra_pvs_only(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mda = _scan_1d(n=3)
    mda.extra_pvs = {}
    data = bytearray(write_mda(workdir / "plain.mda", mda).read_bytes())
    extras = (
        _i(2)
        + _s("pv:ok")
        + _s("")
        + _i(DBR_STRING)
        + _s("fine")
        + _s("pv:enum")
        + _s("")
        + _i(31)
        + _i(1)
        + _s("")
        + _i(1)
    )
    data[20:24] = _i(len(data))
    odd = workdir / "odd.mda"
    odd.write_bytes(bytes(data) + extras)
    with caplog.at_level(logging.WARNING, logger="nanobeam_bluesky.formats._mda"):
        back = read_mda(odd)
    assert back.extra_pvs == {"pv:ok": "fine"}
    assert "pv:enum" in caplog.text and "DBR type 31" in caplog.text
    np.testing.assert_allclose(back.scan.positioners[0].values, [-0.5, 0.0, 0.5])


def test_writer_refuses_inconsistent_scans(workdir: Path) -> None:
    mda = _scan_1d(n=3)
    mda.scan.positioners[0].values = np.zeros(4)
    with pytest.raises(InputError, match="more than the scan's 3 requested points"):
        write_mda(workdir / "x.mda", mda)
    two = _scan_2d(ny=3, nx=2)
    two.scan.current_point = 1  # 3 inner scans for 1 acquired row
    with pytest.raises(InputError, match="inner scans"):
        write_mda(workdir / "y.mda", two)
    with pytest.raises(InputError, match="disagree"):
        write_mda(
            workdir / "z.mda",
            MdaFile(version=1.4, scan_number=1, rank=2, dimensions=(3,), scan=_scan_1d().scan),
        )
