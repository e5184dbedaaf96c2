"""``nanobeam calibrate``: film thickness, hot/dead pixels, count scale, background and (under a
stated assumption) the beam centre, from simulated scans with known departures."""

from __future__ import annotations

import numpy as np
import pytest

from nanobeam_bluesky.cli import main
from nanobeam_bluesky.departures import random_parameters
from nanobeam_bluesky.physics import Instrument, simulate_roi
from nanobeam_bluesky.quality import Flag
from nanobeam_bluesky.scans import calibrate, find_bad_pixels

pytestmark = pytest.mark.integration  # whole file: about 45 s on two cores

HOT = [(10, 20), (70, 64), (100, 5)]
DEAD = [(50, 50), (64, 80)]
#: Expected counts of a fully lit binned pixel at the Laue maximum, and background per binned pixel.
SCALE, BACKGROUND = 9.0, 0.05


@pytest.fixture(scope="module")
def scan():
    """200 raw ROIs of a 100 A film (the instrument says 117), with hot and dead pixels."""
    inst = Instrument()
    rng = np.random.default_rng(3)
    params = random_parameters(inst, 200, rng)
    raw = simulate_roi(*params.T, inst, upsample=8, thickness_angstrom=100.0)
    # A raw pixel holds the mean over its area: a binned pixel (2 x 2 summed) expects SCALE * I + b.
    counts = rng.poisson((SCALE * raw + BACKGROUND) / 4).astype(np.float32)
    for r, c in HOT:
        counts[:, r, c] = rng.poisson(200, len(counts))
    for r, c in DEAD:
        counts[:, r, c] = 0
    return counts, inst


@pytest.fixture(scope="module")
def calibration(scan, model):
    counts, inst = scan
    return calibrate(counts, model.predictor, inst)


def test_finds_thickness_pixels_scale_and_background(calibration):
    cal = calibration
    assert cal.measured == 200
    assert abs(cal.thickness_angstrom - 100.0) < 3.0
    assert cal.thickness_sd_angstrom < 1.0
    assert cal.thickness_spread_angstrom < 2.0  # one film thickness everywhere
    assert sorted(cal.hot_pixels) == HOT
    assert sorted(cal.dead_pixels) == DEAD  # and nothing else
    assert abs(cal.count_scale[0] - SCALE) < 0.05 * SCALE
    assert abs(cal.background[0] - BACKGROUND) < 0.01
    assert cal.beam_centre_offset_px is None  # not identifiable without an assumption
    assert "beam centre: not estimated" in cal.summary()


def test_no_bad_pixels_in_a_clean_scan(scan):
    counts, _ = scan
    clean = counts.copy()
    rng = np.random.default_rng(0)
    for r, c in HOT + DEAD:
        clean[:, r, c] = clean[:, r, c + 1] if c + 1 < 128 else rng.poisson(0.1, len(clean))
    assert find_bad_pixels(clean) == ([], [])


def test_round_trip_fewer_flags(calibration, scan, model, tmp_path):
    counts, inst = scan
    path, mask_path = tmp_path / "cal.yaml", tmp_path / "mask.npy"
    calibration.save(path, mask_path)
    loaded = Instrument.load(path)
    assert loaded.film_thickness_angstrom == pytest.approx(calibration.thickness_angstrom, abs=0.01)
    assert sorted(loaded.detector_mask_pixels) == sorted(HOT + DEAD)
    mask = np.load(mask_path)
    assert mask.shape == (128, 128) and mask.dtype == bool and mask.sum() == len(HOT + DEAD)
    # a model that measures the film flags a film not the instrument's in the pooled test
    bad = np.uint16(Flag.THICKNESS | Flag.POOR_FIT | Flag.POOLED_MISMATCH)

    def flagged(instrument):
        out = model.predictor.analyse(counts, instrument=instrument, allow_instrument_mismatch=True)
        return int(((out.flags & bad) != 0).sum()), out

    before, _ = flagged(inst)
    after, out = flagged(loaded)
    assert after < before
    assert out.pooled["pooled_mismatch"] == 0


def _offset_scan(path, rows_raw: int, cols_raw: int, n: int = 120):
    """Frames of a beam centre off by (rows_raw, cols_raw) raw pixels, tilts of mean zero."""
    import h5py

    inst = Instrument()
    rng = np.random.default_rng(5)
    params = random_parameters(inst, n, rng)
    params[:, 1:] -= params[:, 1:].mean(0)  # the assumption holds exactly
    margin = 8
    wide = inst.replace(roi_pixels=inst.roi_pixels + 2 * margin)
    raw = simulate_roi(*params.T, wide, upsample=8)
    r0, c0 = margin - rows_raw, margin - cols_raw  # the pattern moves by +rows_raw, +cols_raw
    cut = raw[:, r0 : r0 + 128, c0 : c0 + 128]
    counts = np.random.default_rng(6).poisson(SCALE * cut / 4).astype(np.uint16)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry/data/data", data=counts)


def test_cli_beam_centre_under_stated_assumption(tmp_path, capsys, model):
    scan_file = tmp_path / "offset.h5"
    _offset_scan(scan_file, rows_raw=1, cols_raw=-2)  # 0.5 and -1 binned pixel
    out = tmp_path / "cal.yaml"
    model_args = [] if model.path is None else ["--model", str(model.path)]
    code = main(
        ["calibrate", str(scan_file), "--out-instrument", str(out), "--assume-mean-tilt-zero", *model_args]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "ASSUMING the scan's mean tilt" in text
    rows, cols = Instrument.load(out).beam_centre_offset_px
    assert abs(rows - 0.5) < 0.1 and abs(cols + 1.0) < 0.1
    assert abs(Instrument.load(out).film_thickness_angstrom - 117.0) < 3.0


def test_too_few_frames_is_one_line(tmp_path, capsys, scan):
    import h5py

    counts, _ = scan
    scan_file = tmp_path / "short.h5"
    with h5py.File(scan_file, "w") as h5:
        h5.create_dataset("/entry/data/data", data=counts[:20].astype(np.uint16))
    code = main(["calibrate", str(scan_file), "--out-instrument", str(tmp_path / "x.yaml"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "at least 100 frames" in err and "has 20" in err


def test_too_little_signal_is_one_line(scan, model):
    counts, inst = scan
    faint = np.random.default_rng(1).poisson(0.002, counts.shape).astype(np.float32)
    with pytest.raises(Exception, match="too little signal") as info:
        calibrate(faint, model.predictor, inst)
    assert "\n" not in str(info.value)
