"""The detector-orientation check and the symmetries behind it (docs/physics.md, "Detector
orientation guide").

The frame symmetries and the orientation algebra are fast unit tests. The check itself runs the
model and the physics check eight times per scan: those tests are marked integration (about 6 s
together on 2 cores, plus the physics check's first compilation when run alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from nanobeam_bluesky.departures import random_parameters
from nanobeam_bluesky.errors import InputError
from nanobeam_bluesky.physics import Instrument, orient, simulate, simulate_roi
from nanobeam_bluesky.scans._orientation import (
    ORIENTATIONS,
    Orientation,
    OrientationReport,
    check_orientation,
    orientation_named,
    relative_orientation,
    save_orientation_figure,
)

INSTRUMENT = Instrument()
#: Expected counts of a fully lit binned pixel at the Laue maximum: enough that a wrong transpose
#: is beyond doubt in a few dozen frames (the seed experiment's 7 would do too, less decisively).
MAX_COUNTS = 50.0


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------- the eight orientations
def test_the_eight_orientations_are_what_the_instrument_keys_do_and_invert():
    assert len({o.name for o in ORIENTATIONS}) == 8
    assert len({(o.transpose, o.flip_rows, o.flip_cols) for o in ORIENTATIONS}) == 8
    raw = np.random.default_rng(0).random((2, 128, 128))
    for o in ORIENTATIONS:
        instrument = o.apply(INSTRUMENT)
        assert instrument.orientation_dict() == o.fields
        np.testing.assert_array_equal(o.to_frame(raw), orient(raw, instrument))
        np.testing.assert_array_equal(o.from_frame(o.to_frame(raw)), raw)
        assert relative_orientation(o, o).name == "as is"
        assert relative_orientation(orientation_named("as is"), o) == o
        assert f"detector_transpose: {str(o.transpose).lower()}" in o.yaml()
    # Orientations that share the transpose differ by flips alone.
    assert relative_orientation(
        orientation_named("transpose"), orientation_named("transpose + flip rows")
    ).name == ("flip rows")
    with pytest.raises(InputError, match="no orientation"):
        orientation_named("upside down")


def test_flipping_rows_is_exactly_chi_of_the_other_sign_and_flipping_columns_nearly_omega_and_strain():
    """The physics behind what the check can and cannot tell (physics.md's orientation guide)."""
    theta_b = INSTRUMENT.bragg_angle_rad
    sin_b = math.sin(theta_b)

    def mirrored_strain(strain: float) -> float:  # the band's 2θ offset from the centre mirrored
        return sin_b / math.sin(2 * theta_b - math.asin(sin_b / (1 + strain))) - 1

    for strain, omega, chi in ((0.003, 0.03, 0.0), (-0.004, -0.02, -0.05), (0.0025, 0.0, 0.1)):
        frame = simulate([strain], [omega], [chi], INSTRUMENT)[0]
        # Rows: the geometry is mirror-symmetric out of the scattering plane.
        np.testing.assert_allclose(frame[::-1], simulate([strain], [omega], [-chi], INSTRUMENT)[0], atol=1e-6)
        mirrored = simulate([mirrored_strain(strain)], [-omega], [chi], INSTRUMENT)[0]
        off = _distance(frame[:, ::-1], mirrored)
        if chi == 0:
            assert off < 0.002, off  # measured 0.0007 (the sampling)
        else:
            # χ slants the band; flipping columns turns the slant the wrong way (measured 0.5-0.6 %).
            assert 0.003 < off < 0.02, off
        assert _distance(frame.T, frame) > 0.5  # a transposed frame is no frame of physics.md


def test_check_orientation_refuses_what_is_not_raw_rois(model):
    binned = np.zeros((4, 64, 64), np.float32)
    with pytest.raises(InputError, match="raw ROIs"):
        check_orientation(binned, model.predictor)
    with pytest.raises(InputError, match="max_frames"):
        check_orientation(np.zeros((4, 128, 128), np.uint16), model.predictor, max_frames=0)


# ---------------------------------------------------------------------------- the check on a scan
@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    """96 raw ROIs (128 x 128, Poisson counts) at random parameters, in physics.md's frame."""
    rng = np.random.default_rng(15)
    params = random_parameters(INSTRUMENT, 96, rng)
    # A raw pixel holds the mean intensity of its binned pixel: a quarter of its counts.
    return rng.poisson(MAX_COUNTS / 4 * simulate_roi(*params.T, INSTRUMENT)).astype(np.uint16)


@pytest.fixture(scope="module")
def reports(model, scan) -> Callable[[str], OrientationReport]:
    """report(name): the check of the scan as a detector mounted ``name`` records it (cached)."""
    cache: dict[str, OrientationReport] = {}

    def report(name: str) -> OrientationReport:
        if name not in cache:
            seen = np.ascontiguousarray(orientation_named(name).from_frame(scan))
            instrument = orientation_named(name).apply(INSTRUMENT) if name == "flip cols" else None
            cache[name] = check_orientation(seen, model.predictor, instrument, max_frames=40)
        return cache[name]

    return report


def _partner(o: Orientation) -> Orientation:
    """The orientation whose frames are ``o``'s with χ of the other sign (rows flipped)."""
    return next(
        p
        for p in ORIENTATIONS
        if (p.transpose, p.flip_cols, p.flip_rows) == (o.transpose, o.flip_cols, not o.flip_rows)
    )


@pytest.mark.integration
@pytest.mark.parametrize("planted", ["as is", "transpose", "flip cols", "transpose + flip rows"])
def test_check_orientation_finds_the_planted_orientation(reports, planted):
    report = reports(planted)
    truth = orientation_named(planted)
    assert len(report.frame_indices) == 40 and report.total_frames == 96
    assert truth in report.candidates
    # The transpose is beyond doubt: the band would run along the wrong axis.
    for row in report.rows:
        if row.orientation.transpose == truth.transpose:
            assert abs(row.median_fit_quality) < 1.0, (row.orientation.name, row.median_fit_quality)
            assert row.flagged_fraction < 0.1, (row.orientation.name, row.flag_counts)
        else:
            assert row.orientation not in report.candidates
            # rejected beyond doubt (measured 7.5-40 SE; a model that fits the film absorbs more)
            assert row.median_fit_quality > 50 and row.excess_z > 6, (row.orientation.name, row.excess_z)
            assert row.flagged_fraction > 0.9
    # Flipping rows is exactly χ -> -χ: never told apart, and said so.
    assert _partner(truth) in report.candidates
    summary = report.summary()
    assert f"detector_transpose: {str(report.best.transpose).lower()}" in summary
    assert "χ → −χ" in summary and "fitted χ must rise" in summary
    # The instrument given (as is, or the planted flip cols) agrees with the frames unless transposed.
    assert report.current_is_consistent == (not truth.transpose)
    if planted == "flip cols":
        assert report.current == truth
    best = report.row(report.best)
    assert best.excess == 0 and best.summed_frame.shape == (64, 64)
    # The forward model at the fitted parameters accounts for the frames' counts.
    assert best.modelled_frames == 40
    assert abs(best.summed_model.sum() / best.summed_frame.sum() - 1) < 0.01


@pytest.mark.integration
def test_the_orientation_figure_is_written(reports, workdir):
    path = save_orientation_figure(reports("transpose"), workdir / "orientation.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
