"""The forward model against the invariants of docs/physics.md (default instrument)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nanobeam_bluesky.errors import InputError
from nanobeam_bluesky.physics import (
    Instrument,
    InstrumentError,
    LibraryError,
    bin_roi,
    crlb,
    library_instrument,
    open_library,
    simulate,
    simulate_exact,
    simulate_roi,
    to_counts,
    write_library,
)

DEFAULT = Instrument()
# A film so thin that sinc^2 is 1 everywhere: the frame is the lit fraction of each pixel.
FLAT = DEFAULT.replace(film_thickness_angstrom=1e-3)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def _annulus_geometry(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Centroid (row, col) and radii (outer, inner) of a lit annulus from its area moments."""
    rows, cols = np.indices(mask.shape) + 0.0
    area = mask.sum()
    row_c, col_c = (mask * rows).sum() / area, (mask * cols).sum() / area
    second = (mask * ((rows - row_c) ** 2 + (cols - col_c) ** 2)).sum()
    # area = pi (ro^2 - ri^2); second = pi (ro^4 - ri^4) / 2  =>  ro^2 + ri^2 = 2 second / area
    s2 = area / math.pi
    p2 = 2 * second / area
    return row_c, col_c, math.sqrt((p2 + s2) / 2), math.sqrt((p2 - s2) / 2)


def _random_parameters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(-0.005, 0.005, n),
        rng.uniform(-0.05, 0.05, n),
        rng.uniform(-0.1, 0.1, n),
    )


def test_default_instrument_matches_physics_table():
    assert DEFAULT.wavelength_angstrom == pytest.approx(1.0972, abs=1e-4)
    assert DEFAULT.k_inv_angstrom == pytest.approx(5.7265, abs=3e-4)  # table rounds lambda
    assert DEFAULT.bragg_angle_deg == pytest.approx(15.867, abs=1e-3)
    assert DEFAULT.convergence_half_angle_rad == pytest.approx(3.406e-3, rel=1e-3)
    assert DEFAULT.tau_inv_angstrom == pytest.approx(7.41e-4, rel=2e-3)
    assert DEFAULT.frame_pixels == 64


def test_focal_length_from_outermost_zone_width():
    dr = 21.874e-3 * DEFAULT.wavelength_angstrom * 1e-10 / 149e-6
    inst = DEFAULT.replace(focal_length_m=None, outermost_zone_width_m=dr)
    assert inst.effective_focal_length_m == pytest.approx(21.874e-3, rel=1e-9)


def test_annulus_centre_and_radii_at_zero():
    frame = simulate(0, 0, 0, FLAT, upsample=16)[0]
    row_c, col_c, r_out, r_in = _annulus_geometry(frame)
    assert row_c == pytest.approx(31.5, abs=0.02)
    assert col_c == pytest.approx(31.5, abs=0.02)
    # physics.md: R d_zp / (2 f delta) = 26.3, R d_cs / (2 f delta) = 13.6 binned pixels.
    assert r_out == pytest.approx(26.3, abs=0.1)
    assert r_in == pytest.approx(13.6, abs=0.1)


@pytest.mark.parametrize(
    ("omega", "chi", "d_row", "d_col"),
    [(0.05, 0.0, 0.0, 13.49), (-0.05, 0.0, 0.0, -13.49), (0.0, 0.1, 7.37, 0.0), (0.0, -0.1, -7.37, 0.0)],
)
def test_tilts_shift_the_annulus(omega, chi, d_row, d_col):
    # A small zone plate keeps the annulus inside the frame at the largest tilts.
    small = FLAT.replace(zone_plate_diameter_m=60e-6, central_stop_diameter_m=20e-6)
    row0, col0, *_ = _annulus_geometry(simulate(0, 0, 0, small, upsample=16)[0])
    row, col, *_ = _annulus_geometry(simulate(0, omega, chi, small, upsample=16)[0])
    # omega: 2 omega R / delta exactly; chi: "about" 2 sin(theta_B) chi R / delta.
    assert col - col0 == pytest.approx(d_col, abs=0.05)
    assert row - row0 == pytest.approx(d_row, abs=0.05)


@pytest.mark.parametrize(("strain", "column"), [(0.0025, 26.0), (0.005, 20.6), (0.0, 31.5)])
def test_laue_band_column_follows_strain(strain, column):
    frame = simulate(strain, 0, 0, upsample=16)[0]
    profile = frame[50:54].mean(axis=0)
    j = int(np.argmax(profile))
    # parabolic interpolation of the maximum
    a, b, c = profile[j - 1 : j + 2]
    peak = j + 0.5 * (a - c) / (a - 2 * b + c)
    theta = math.asin(
        DEFAULT.reflection_l * DEFAULT.wavelength_angstrom / (2 * DEFAULT.lattice_c_angstrom * (1 + strain))
    )
    expected = 31.5 + (theta - DEFAULT.bragg_angle_rad) * 0.85 / 110e-6
    assert expected == pytest.approx(column, abs=0.05)
    assert peak == pytest.approx(expected, abs=0.1)


def test_mirror_symmetric_in_rows_when_chi_is_zero():
    strain, omega, _ = _random_parameters(6, seed=1)
    frames = simulate(strain, omega, 0.0)
    np.testing.assert_allclose(frames, frames[:, ::-1, :], atol=1e-6)
    tilted = simulate(strain, omega, 0.05)
    assert np.abs(tilted - tilted[:, ::-1, :]).max() > 0.1


def test_laue_maximum_is_one():
    frame = simulate(0, 0, 0)[0]
    assert frame.max() == pytest.approx(1.0, abs=2e-3)
    assert frame.dtype == np.float32 and frame.shape == (64, 64)


@pytest.mark.parametrize("upsample", [4, 8])
def test_fast_path_matches_exact_path(upsample):
    params = _random_parameters(16, seed=2)
    fast = simulate(*params, upsample=upsample)
    exact = simulate_exact(*params, upsample=upsample)
    assert _rel_l2(fast, exact).max() <= 0.005


def test_default_simulation_is_close_to_pixel_integration():
    # 32 x 32 sub-pixels per binned pixel is close to exact pixel integration.
    params = _random_parameters(6, seed=3)
    reference = simulate_exact(*params, upsample=32)
    assert _rel_l2(simulate(*params), reference).max() <= 0.02


def test_grid_inputs_share_tilt_work_without_changing_frames():
    strain = np.array([-0.004, 0.0, 0.003, 0.001])
    omega = np.array([0.01, 0.01, 0.01, -0.02])
    chi = np.array([0.05, 0.05, 0.05, 0.0])
    together = simulate(strain, omega, chi)
    one_by_one = np.concatenate([simulate(e, w, c) for e, w, c in zip(strain, omega, chi, strict=True)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)


def test_scalar_and_array_inputs():
    assert simulate(0.001, [0.0, 0.01, 0.02], 0.0).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="common length"):
        simulate([0, 0.001], [0.0, 0.01, 0.02], 0.0)
    with pytest.raises(ValueError, match="1-D"):
        simulate(np.zeros((2, 2)), 0, 0)
    with pytest.raises(ValueError, match="non-finite"):
        simulate(np.nan, 0, 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"detector_distance_m": 0}, "detector_distance_m"),
        ({"detector_pixel_m": -55e-6}, "detector_pixel_m"),
        ({"zone_plate_diameter_m": 0}, "zone_plate_diameter_m"),
        ({"energy_kev": float("nan")}, "energy_kev"),
        ({"central_stop_diameter_m": 149e-6}, "central_stop_diameter_m"),
        ({"reflection_l": 8}, "reflection_l=8 cannot diffract"),
        ({"focal_length_m": None}, "focal_length_m"),
        ({"binning": 3}, "multiple of binning"),
        ({"strain_range": (0.01, -0.01)}, "strain_range"),
    ],
)
def test_invalid_instrument_names_the_field(changes, message):
    with pytest.raises(InstrumentError, match=message):
        DEFAULT.replace(**changes)


def test_unknown_config_key_is_refused(tmp_path):
    path = tmp_path / "beamline.yaml"
    path.write_text("energy_kev: 10.0\ndetector_distanse_m: 1.0\n")
    with pytest.raises(InstrumentError, match=r"unknown instrument key.*detector_distanse_m"):
        Instrument.load(path)
    path.write_text("energy_kev: [unclosed\n")
    with pytest.raises(InstrumentError, match="not valid"):
        Instrument.load(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_instrument_config_round_trip(tmp_path, suffix):
    inst = DEFAULT.replace(energy_kev=10.0, detector_distance_m=1.1, detector_flip_rows=True)
    path = tmp_path / f"beamline{suffix}"
    inst.save(path)
    assert Instrument.load(path) == inst
    assert Instrument.from_dict(inst.to_dict()) == inst


def test_to_counts_scales_to_max_counts_and_draws_poisson():
    frames = simulate([0.0, 0.002], [0.0, 0.01], [0.0, -0.03])
    counts = to_counts(np.repeat(frames, 200, axis=0), 7.0, rng=0)
    assert counts.dtype == np.float32
    assert np.array_equal(counts, np.round(counts))
    mean = counts.reshape(2, 200, 64, 64).mean(axis=1)
    expected = 7.0 * frames / frames.max()
    # Poisson: standard error of a 200-frame mean is sqrt(mu / 200) <= 0.19 counts.
    assert np.abs(mean - expected).max() < 6 * math.sqrt(7.0 / 200)
    # A library-wide scale: counts = max_counts * frames / scale.
    half = to_counts(np.repeat(frames, 200, axis=0), 7.0, scale=2 * frames.max(), rng=1)
    assert half.mean() == pytest.approx(expected.mean() / 2, rel=0.02)
    with pytest.raises(ValueError, match="non-negative"):
        to_counts(-frames)


def test_bin_roi_of_raw_detector_equals_binned_frames():
    raw = simulate_roi(0.001, 0.02, -0.04)  # (1, 128, 128), mean intensity per 55 um pixel
    detector = np.zeros((1, 516, 516), dtype=np.float32)
    detector[0, 100:228, 300:428] = raw[0]
    binned = bin_roi(detector, center=(164, 364), reduce="mean")
    np.testing.assert_allclose(binned, simulate(0.001, 0.02, -0.04), atol=2e-3)
    np.testing.assert_allclose(bin_roi(detector, (164, 364)), 4 * binned, rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        bin_roi(detector, center=(20, 364))


def test_bin_roi_applies_detector_orientation():
    raw = simulate_roi(0.0, 0.03, 0.06)[0]
    # A detector mounted so that its image is the physics frame mirrored in columns, then
    # transposed; orient() undoes it: transpose first, then flip columns.
    mounted = raw[:, ::-1].T
    inst = DEFAULT.replace(detector_transpose=True, detector_flip_cols=True)
    oriented = bin_roi(mounted[None], (64, 64), instrument=inst)
    np.testing.assert_allclose(oriented, bin_roi(raw[None], (64, 64)))
    assert not np.allclose(bin_roi(mounted[None], (64, 64)), oriented)


def test_crlb_matches_documented_values():
    # physics.md / issue: averaged over the parameter box, about 8.4e-5, 1.0e-4 deg, 2.9e-4 deg.
    bound = crlb(*_random_parameters(150, seed=4))
    rms = np.sqrt((bound**2).mean(axis=0))
    np.testing.assert_allclose(rms, [8.4e-5, 1.0e-4, 2.9e-4], rtol=0.06)


def test_per_frame_thickness_is_the_instrument_of_that_thickness():
    strain, omega, chi = _random_parameters(4, seed=2)
    thickness = np.array([80.0, 117.0, 140.0, 158.0])  # ±35 % around 117 Å
    frames = simulate(strain, omega, chi, thickness_angstrom=thickness)
    for i, t in enumerate(thickness):
        one = simulate(strain[i], omega[i], chi[i], DEFAULT.replace(film_thickness_angstrom=t))[0]
        np.testing.assert_array_equal(frames[i], one)  # same arithmetic, one frame at a time
    with pytest.raises(InputError, match="thickness_angstrom must be positive"):
        simulate(0.0, 0.0, 0.0, thickness_angstrom=-5.0)


def test_extended_crlb_each_unknown_only_raises_the_bound():
    """The bound with the thickness and the count scale (and a background) unknown: never below
    the 3-parameter bound, and at the values docs/physics.md states (7 counts, the default box)."""
    params = _random_parameters(150, seed=4)
    base = crlb(*params)
    extended = crlb(*params, with_thickness=True, nuisance=("scale",))
    assert extended.shape == (150, 4)
    assert np.all(extended[:, :3] >= base * (1 - 1e-9))
    few = tuple(values[:30] for values in params)
    with_background = crlb(*few, background=0.05, with_thickness=True, nuisance=("scale", "background"))
    assert np.all(with_background[:, :3] >= crlb(*few, background=0.05) * (1 - 1e-9))
    rms = np.sqrt((extended**2).mean(axis=0))
    # An unknown film costs strain 1.5x (the band moves with both), the tilts almost nothing.
    np.testing.assert_allclose(rms, [1.26e-4, 1.02e-4, 2.96e-4, 1.78], rtol=0.06)
    with pytest.raises(InputError, match="background > 0"):
        crlb(*params, nuisance=("background",))


def test_crlb_counts_only_the_observed_pixels():
    """Pixels the instrument declares dead carry no information: a dead band through the frame's
    centre (the README example's module gap, raw rows 63-64) gives the bound of the open detector
    with binned rows 31-32 left out, above the open one; a wrong mask shape is refused."""
    params = _random_parameters(40, seed=5)
    gap = Instrument().replace(detector_mask_rows=[63, 64])
    open_detector = crlb(*params)
    rows = np.zeros((64, 64), dtype=bool)
    rows[31:33] = True
    with_gap = crlb(*params, gap)
    # same frames, same pixels left out: equal to the last bits of the matrix inverse
    np.testing.assert_allclose(with_gap, crlb(*params, mask=rows), rtol=1e-9)
    assert np.all(with_gap >= open_detector * (1 - 1e-9))
    rms_ratio = np.sqrt((with_gap**2).mean(0) / (open_detector**2).mean(0))
    assert rms_ratio.max() > 1.005, rms_ratio  # the band crosses the ring: information is lost
    with pytest.raises(InputError, match="mask must be"):
        crlb(*params, mask=np.zeros((128, 128), dtype=bool))


def test_library_round_trip(tmp_path):
    path = write_library(tmp_path / "lib.h5", grid_points=5, upsample=4, progress=False)
    assert not (tmp_path / "lib.h5.partial").exists()
    ds = open_library(path)
    assert dict(ds["frames"].sizes) == {"strain": 5, "omega": 5, "chi": 5, "row": 64, "col": 64}
    assert ds["frames"].chunks is not None  # lazy: read chunk by chunk
    np.testing.assert_allclose(ds["omega"], np.linspace(-0.05, 0.05, 5))
    frame = ds["frames"].isel(strain=1, omega=3, chi=4).values
    label = ds["labels"].isel(strain=1, omega=3, chi=4).values
    np.testing.assert_allclose(label, [-0.0025, 0.025, 0.1])
    np.testing.assert_allclose(frame, simulate(*label, upsample=4)[0], atol=1e-6)
    assert library_instrument(ds) == Instrument()
    assert ds.attrs["scale"] == pytest.approx(float(ds["frames"].max()))
    assert ds.attrs["upsample"] == 4 and ds.attrs["max_counts"] == 7.0
    ds.close()


def test_interrupted_library_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import nanobeam_bluesky.physics.library as library

    def crash(*args, **kwargs):
        yield 0, np.zeros((3, 3, 64, 64), np.float32)
        raise KeyboardInterrupt

    monkeypatch.setattr(library, "iter_grid", crash)
    with pytest.raises(KeyboardInterrupt):
        write_library(tmp_path / "lib.h5", grid_points=3, progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(LibraryError, match="not a readable HDF5"):
        open_library(tmp_path / "bad.h5")
    with pytest.raises(LibraryError, match="no library"):
        open_library(tmp_path / "missing.h5")


def test_simulate_tensor_is_simulate_on_a_device():
    from nanobeam_bluesky.physics import simulate_tensor

    rng = np.random.default_rng(4)
    params = [rng.uniform(-5e-3, 5e-3, 40), rng.uniform(-0.05, 0.05, 40), rng.uniform(-0.1, 0.1, 40)]
    frames = simulate_tensor(*params, device="cpu")
    assert frames.dtype == torch.float32 and frames.device.type == "cpu"
    np.testing.assert_array_equal(frames.numpy(), simulate(*params))  # same arithmetic, bit for bit
