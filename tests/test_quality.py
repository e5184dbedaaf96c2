"""Trust: plausibility flags, the physics check, honest errors, the detector's orientation.

Frames come from ``nanobeam_bluesky.departures`` (32 x 32 sub-pixels: near-exact pixel
integration) or from the simulator's default 8 x 8 sampling, as each test says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanobeam_bluesky import load_pretrained
from nanobeam_bluesky.departures import DEPARTURES, _gap, _ideal, _no_ring, random_parameters
from nanobeam_bluesky.inference import InstrumentMismatchError
from nanobeam_bluesky.physics import FrameModel, Instrument, crlb, simulate, simulate_roi, to_counts
from nanobeam_bluesky.quality import (
    Flag,
    PhysicsCheck,
    PooledConsistency,
    deviance_moments,
    prepare_frames,
)

INSTRUMENT = Instrument()
PARAMS = ("strain", "omega", "chi")


@pytest.fixture(scope="module")
def predictor():
    return load_pretrained()


def _estimates(ds) -> np.ndarray:
    return np.stack([ds[p].values for p in PARAMS], 1)


def _bound(params: np.ndarray, instrument: Instrument = INSTRUMENT, **kwargs) -> np.ndarray:
    return np.sqrt((crlb(*params[:60].T, instrument, **kwargs) ** 2).mean(axis=0))


def _model_bound(predictor, params: np.ndarray, **kwargs) -> np.ndarray:
    """The (strain, omega, chi) bound of the problem the model solves: the film unknown (and the
    count scale fitted) for a model that measures it, else the instrument's film."""
    if predictor.card.predicts_thickness:
        kwargs |= {"with_thickness": True, "nuisance": ("scale",)}
    return _bound(params, **kwargs)[:3]


# ---------------------------------------------------------------------------- the forward model
def test_frame_model_matches_the_simulator_and_its_derivatives_match_finite_differences():
    fm = FrameModel.for_instrument(INSTRUMENT)
    rng = np.random.default_rng(0)
    params = np.vstack(
        [
            random_parameters(INSTRUMENT, 40, rng),
            [[0.005, 0.05, 0.1], [-0.005, -0.05, -0.1], [0.0, 0.05, -0.1]],
        ]
    )  # box corners
    fast = fm.render(*params.T)
    reference = simulate(*params.T, upsample=32)
    rel = np.linalg.norm(fast - reference, axis=(1, 2)) / np.linalg.norm(reference, axis=(1, 2))
    assert rel.max() < 0.003, rel.max()  # measured 0.0018 (the table is sampled 32 x 32)
    # Derivatives against central differences of the model itself, steps well inside one
    # tabulated sub-pixel cell (1/16 pixel): strain and thickness analytic, tilts with the mask.
    p = torch.as_tensor(params[:10])
    ones, zeros = torch.full((10,), 7.0, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    ev = fm.evaluate(p[:, 0], p[:, 1], p[:, 2], ones, zeros)
    steps = (("strain", 2e-6, 0.01), ("omega", 2e-5, 0.05), ("chi", 2e-5, 0.05))
    for i, (name, h, tol) in enumerate(steps):
        up, down = params[:10].copy(), params[:10].copy()
        up[:, i] += h
        down[:, i] -= h
        diff = (fm.render(*up.T, scale=7.0) - fm.render(*down.T, scale=7.0)) / (2 * h)
        analytic = np.zeros((10, fm.frame_pixels + 2 * fm.pad, fm.frame_pixels + 2 * fm.pad)).reshape(10, -1)
        np.put_along_axis(analytic, ev.index.numpy(), getattr(ev, f"d_{name}").numpy(), axis=1)
        analytic = analytic.reshape(10, fm.frame_pixels + 2 * fm.pad, -1)[
            :, fm.pad : -fm.pad, fm.pad : -fm.pad
        ]
        # Measured 0.002 (strain), 0.027 and 0.0001 (tilts: the in-pixel moments' motion is left out).
        assert np.linalg.norm(analytic - diff) / np.linalg.norm(diff) < tol, name


def test_fused_kernel_computes_what_the_reference_model_gives():
    check = PhysicsCheck(INSTRUMENT)
    fm = check.model
    rng = np.random.default_rng(1)
    params = random_parameters(INSTRUMENT, 8, rng)
    counts = to_counts(simulate(*params.T), 7.0, scale=1.0, rng=rng)
    p = torch.as_tensor(params)
    scale = torch.full((8,), 7.0, dtype=torch.float64)
    ev = fm.evaluate(p[:, 0], p[:, 1], p[:, 2], scale, torch.zeros(8, dtype=torch.float64))
    n = torch.gather(fm.pad_frames(torch.as_tensor(counts)), 1, ev.index)
    obs = ev.inside.float()
    mu = ev.mu + 1e-4 * 7.0
    jac = torch.stack([ev.d_strain, ev.d_omega, ev.d_chi, ev.intensity, ev.d_thickness], 1) * obs[:, None]
    fisher = torch.einsum("bip,bjp->bij", jac / mu[:, None], jac).double().numpy()
    grad = torch.einsum("bip,bp->bi", jac, (n / mu - 1) * obs).double().numpy()
    from nanobeam_bluesky.quality._kernel import N_SUMS, likelihood_sums, pack_geometry

    g = fm.geometry(*params.T)
    sums = np.empty((8, N_SUMS))
    a = fm.arrays
    flat = counts.reshape(8, -1)
    likelihood_sums(
        flat,
        np.zeros((0, 0), np.float32),
        fm.frame_pixels,
        a["support_row"],
        a["support_col"],
        a["u0"],
        a["v0"],
        a["m0"],
        a["mu"],
        a["mv"],
        g.corner,
        pack_geometry(g),
        np.full(8, 7.0),
        flat.sum(1, dtype=np.float64),
        np.full(8, 4096.0),
        a["phases"],
        a["two_k"],
        a["k_px"],
        1e-4,
        *check._deviance,
        sums,
    )
    # float32 tensors against float64 sums over 1,900 pixels: 1e-4 relative.
    np.testing.assert_allclose(
        sums[:, 5:30].reshape(8, 5, 5), fisher, rtol=2e-4, atol=1e-6 * np.abs(fisher).max()
    )
    scale_ = np.abs(grad).max(axis=0) + np.sqrt(np.diagonal(fisher, axis1=1, axis2=2)).max(axis=0)
    np.testing.assert_allclose(sums[:, :5] / scale_, grad / scale_, atol=1e-4)


def test_deviance_moments_are_those_of_poisson_counts():
    rng = np.random.default_rng(2)
    for mu in (0.01, 0.5, 3.0, 40.0):
        n = rng.poisson(mu, 400_000).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 2 * (np.where(n > 0, n * np.log(n / mu), 0) - (n - mu))
        mean, var = deviance_moments([mu])
        # 400,000 draws: the sample mean scatters by sqrt(var / 4e5) < 0.3 %.
        assert mean[0] == pytest.approx(d.mean(), rel=0.01, abs=1e-4), mu
        assert var[0] == pytest.approx(d.var(), rel=0.03, abs=1e-3), mu


# ---------------------------------------------------------------------------- flags
def test_each_flag_fires_on_its_own_case(predictor):
    rng = np.random.default_rng(3)
    good = _ideal(12, rng, INSTRUMENT).counts
    cases = {}
    saturated = np.round(good).astype(np.uint16)
    saturated[:, 10, 10] = 65535  # the detector's overflow marker
    cases[Flag.SATURATED] = predictor.predict(saturated)
    hot = good.copy()
    hot[:, 20, 40] = 500  # stuck high: far above a fully lit pixel at 7 counts
    hot[:, 5, 9] = 2000
    cases[Flag.HOT_PIXEL] = predictor.predict(hot)
    cases[Flag.NON_INTEGER] = predictor.predict(good * 1.37)
    cases[Flag.NO_RING] = predictor.predict(_no_ring(12, rng, INSTRUMENT, kind="flat field").counts)
    cases[Flag.POOR_FIT] = predictor.predict(_gap(12, rng, INSTRUMENT, declared=False).counts)
    thin_film = predictor.predict(_ideal(12, rng, INSTRUMENT, thickness=95.0).counts)
    least = {Flag.POOR_FIT: 0.75}
    if predictor.card.predicts_thickness:
        # The film is measured per frame: a 95 A film is the scan's pooled film 19 % off the
        # instrument's, and THICKNESS is a frame too faint to say its film (0.6 counts: 99 %).
        cases[Flag.POOLED_MISMATCH] = thin_film
        cases[Flag.THICKNESS] = predictor.predict(_ideal(12, rng, INSTRUMENT, max_counts=0.6).counts)
        least[Flag.THICKNESS] = 0.9
    else:  # the instrument's film, tested per frame
        cases[Flag.THICKNESS] = thin_film
    for bit, ds in cases.items():
        flags = ds["flag"].values
        # A module gap crossing the annulus shows in the deviance of most frames (measured 98-100 %
        # of 300); every other case is flagged in every frame.
        assert np.mean(flags & bit != 0) >= least.get(bit, 1.0), (bit.name, flags)
    # The plausibility flags name what they found and leave the numbers usable: the bad pixels
    # are left out of the fit.
    for bit in (Flag.SATURATED, Flag.HOT_PIXEL):
        assert np.all(cases[bit]["flag"].values == bit), bit.name
        assert np.isfinite(cases[bit]["strain"].values).all()
    assert np.isnan(cases[Flag.NO_RING]["strain"].values).all()


def test_frames_with_no_ring_or_a_broken_pixel_get_no_confident_value(predictor):
    """What the network alone answered with flag 0 and an *_err of 1e-7 (the issue's list)."""
    rng = np.random.default_rng(9)
    good = _ideal(8, rng, INSTRUMENT).counts
    overflow = good.copy()
    overflow[:, 30, 33] = 2.0**32 - 1  # a pixel at 2^32 - 1 in float data: most of the frame's counts
    corrupted = good.copy()
    corrupted[:, 16:32, 8:40] = rng.integers(0, 40, (8, 16, 32))  # a corrupted chunk
    noise = _no_ring(8, rng, INSTRUMENT, kind="noise").counts
    for name, frames, expected in (
        ("overflow", overflow, Flag.HOT_PIXEL),
        ("corrupted chunk", corrupted, Flag.POOR_FIT),
        ("noise", noise, Flag.NO_RING),
    ):
        flags = predictor.predict(frames)["flag"].values
        assert np.all(flags & expected), (name, flags)
    # The overflowing pixel is left out: the rest of the frame still measures.
    ds = predictor.predict(overflow)
    ratio = np.abs(_estimates(ds) - _estimates(predictor.predict(good))) / np.stack(
        [ds[f"{p}_err"].values for p in PARAMS], 1
    )
    assert ratio.max() < 1.0, ratio


def test_pooled_check_flags_a_film_a_few_angstrom_off_and_says_its_thickness(predictor):
    rng = np.random.default_rng(4)
    frames = _ideal(200, rng, INSTRUMENT, thickness=113.0)
    ds = predictor.predict(frames.counts)
    # Per frame the thickness test sees a 4 A change only sometimes (measured 6 %); the pooled
    # mean of its z-score (-2.3) flags them all and estimates the film.
    assert np.mean(ds["flag"].values & Flag.THICKNESS != 0) < 0.3
    assert np.all(ds["flag"].values & Flag.POOLED_MISMATCH)
    thickness, sd = ds.attrs["pooled_thickness_angstrom"], ds.attrs["pooled_thickness_sd_angstrom"]
    assert abs(thickness - 113.0) < max(5 * sd, 1.0), (thickness, sd)  # measured 113.2 +- 0.1
    pool = PooledConsistency()
    assert not pool.mismatch  # nothing pooled yet


def test_a_scan_whose_film_lies_outside_the_trained_films_is_flagged_in_every_frame(predictor):
    """A film calibrated in the instrument (68 A) outside the shipped model's 76-158 A: some frames'
    own fits land just inside the range (72-75 A, measured 16 of 200) with strain errors twice their
    stated error. The scan's pooled film (69 A) says the set is out of range: every frame is flagged."""
    rng = np.random.default_rng(3)
    params = random_parameters(INSTRUMENT, 200, rng)
    film = 68.0
    counts = rng.poisson(7 * simulate(*params.T, INSTRUMENT, thickness_angstrom=film)).astype(np.float32)
    declared = INSTRUMENT.replace(film_thickness_angstrom=film)
    ds = predictor.predict(counts, instrument=declared, allow_instrument_mismatch=True)
    low, high = predictor.card.thickness_range_angstrom
    assert ds.attrs["pooled_thickness_angstrom"] < low - 0.05 * (high - low)  # measured 68.9
    assert np.all(ds["flag"].values & Flag.OUT_OF_RANGE)
    # The frame's own films alone leave some inside: the pooled film is what flags them.
    inside = predictor.thickness_range_flags(ds["thickness"].values) == 0
    assert inside.sum() > 0, "no frame's own film landed inside the range: the test no longer tests the pool"
    # The film the model was trained for: the pooled film is inside, nothing flagged out of range.
    ideal = rng.poisson(7 * simulate(*params.T, INSTRUMENT)).astype(np.float32)
    assert not np.any(predictor.predict(ideal)["flag"].values & Flag.OUT_OF_RANGE)


def test_false_alarms_on_frames_the_model_describes_stay_below_one_percent(predictor):
    """2,100 frames of the simulator's default sampling, 700 each at 3.5, 7 and 14 counts."""
    rng = np.random.default_rng(5)
    params = random_parameters(INSTRUMENT, 700, rng)
    clean = simulate(*params.T)
    flagged, total, z = 0, 0, []
    for level in (3.5, 7.0, 14.0):
        ds = predictor.predict(to_counts(clean, level, scale=1.0, rng=rng))
        flagged += int(np.count_nonzero(ds["flag"].values))
        total += ds.sizes["frame"]
        z.append(ds["fit_quality"].values)
    z = np.concatenate(z)
    # Measured: 0 of 2,100 flagged; fit_quality mean 0.0, sd 1.0, largest 3.7 (threshold 4).
    assert flagged <= 0.01 * total, flagged
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.25, (z.mean(), z.std())


@pytest.mark.integration  # statistics over thousands of frames, or training: slow
@pytest.mark.parametrize("level", [1.0, 7.0, 700.0])
def test_expected_error_is_the_actual_error_from_1_to_700_counts(predictor, level):
    """Frames of near-exact pixel integration (32 x 32 sub-pixels), as a detector records them."""
    rng = np.random.default_rng(int(level * 10))
    frames = _ideal(400, rng, INSTRUMENT, max_counts=level)
    ds = predictor.predict(frames.counts)
    flags = ds["flag"].values
    film = predictor.card.predicts_thickness
    if film and level < 2:  # frames too faint to say their film (measured 42 % at 1 count)
        # every flagged frame is one too faint to say its film (its film may also be out of the box)
        assert np.all((flags == 0) | (flags & Flag.THICKNESS != 0)), np.unique(flags)
        assert np.mean(flags == 0) > 0.4
    else:
        assert np.all(flags == 0)
    keep = flags == 0
    error = (_estimates(ds) - frames.params)[keep]
    stated = np.stack([ds[f"{p}_err"].values for p in PARAMS], 1)[keep]
    ratio = np.sqrt((stated**2).mean(axis=0)) / np.sqrt((error**2).mean(axis=0))
    # Measured (300-2,000 frames): 0.75-1.13 at every level; the goal is 0.7-1.4. 400 frames
    # scatter a ratio by ~4 %.
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    covered = np.mean(np.abs(error) < 2 * stated, axis=0)
    assert np.all(covered > 0.88), covered  # 95 % for Gaussian errors
    # And the estimate sits at the Cramer-Rao bound (measured 0.93-1.29x) -- of the problem the
    # model solves: with its film fitted, that of the film unknown.
    bound = _model_bound(predictor, frames.params[keep], max_counts=level)
    ratio_to_bound = np.sqrt((error**2).mean(axis=0)) / bound
    assert np.all(ratio_to_bound < 1.4), ratio_to_bound


@pytest.mark.integration  # statistics over thousands of frames, or training: slow
def test_likelihood_step_takes_the_network_to_the_bound_on_ideal_frames(predictor):
    rng = np.random.default_rng(6)
    frames = _ideal(600, rng, INSTRUMENT)
    checked = predictor.predict(frames.counts)
    network = predictor.predict(frames.counts, check=False)
    bound = _model_bound(predictor, frames.params)
    ratios = [
        np.sqrt(((_estimates(ds) - frames.params) ** 2).mean(axis=0)) / bound for ds in (checked, network)
    ]
    # Measured: network 1.31, 1.13, 1.00; likelihood step 0.95, 1.04, 0.93 (the goal: 1.2).
    assert np.all(ratios[0] < 1.2), ratios[0]
    assert ratios[0][0] < 0.9 * ratios[1][0], ratios  # strain, the network's weakest
    assert "fit_quality" not in network or np.isnan(network["fit_quality"]).all()


def test_masked_pixels_are_left_out_and_a_declared_gap_costs_nothing(predictor):
    rng = np.random.default_rng(7)
    frames = _gap(200, rng, INSTRUMENT, declared=True)
    masked_inst = INSTRUMENT.replace(detector_mask_rows=[80, 81], detector_mask_cols=[48, 49])
    for kwargs in ({"mask": frames.mask}, {"instrument": masked_inst}):
        ds = predictor.predict(frames.counts, **kwargs)
        assert np.mean(ds["flag"].values != 0) < 0.02
        ratio = np.sqrt(((_estimates(ds) - frames.params) ** 2).mean(axis=0)) / _model_bound(
            predictor, frames.params
        )
        assert np.all(ratio < 1.3), (kwargs.keys(), ratio)  # measured 0.95-1.06


def test_departure_registry_covers_the_benchmark():
    names = " ".join(d.name for d in DEPARTURES)
    for needed in (
        "film 90",
        "film 150",
        "background 0.02",
        "background 0.1",
        "hot pixel",
        "dead row",
        "beam centre off by 0.5",
        "beam centre off by 1",
        "1 counts",
        "700 counts",
        "keV",
        "blank",
        "flat field",
        "noise",
    ):
        assert needed in names, needed


# ---------------------------------------------------------------------------- plausibility
def test_prepare_frames_orients_bins_and_masks_raw_rois():
    inst = INSTRUMENT.replace(
        detector_flip_cols=True,
        detector_transpose=True,
        detector_mask_pixels=[[0, 5]],
        detector_saturation_counts=1000,
    )
    raw = np.zeros((1, 128, 128), np.float32)
    raw[0, 2, 7] = 3  # detector pixel (row 2, col 7)
    raw[0, 100, 101] = 1000  # saturated
    prepared = prepare_frames(raw, inst)
    # Transpose, then flip columns: detector (r, c) -> physics (c, 127 - r), binned // 2.
    assert prepared.counts[0, 3, 62] == 3  # (2, 7) -> (7, 2) -> (7, 125) -> binned (3, 62)
    assert prepared.masked[0, 2, 63]  # mask pixel (0, 5) -> (5, 127) -> binned (2, 63)
    assert prepared.masked[0, 50, 13] and prepared.counts[0, 50, 13] == 0  # (100, 101) -> (101, 27)
    assert prepared.flags[0] & Flag.SATURATED
    with pytest.raises(ValueError, match="raw ROIs"):
        prepare_frames(np.zeros((2, 100, 100)), inst)


def test_instrument_masks_round_trip_and_bad_ones_are_refused():
    inst = Instrument(
        detector_mask_rows=[3, 1, 3], detector_mask_pixels=[[5, 6]], beam_centre_offset_px=[0.5, -1]
    )
    assert inst.detector_mask_rows == (1, 3) and inst.detector_mask_pixels == ((5, 6),)
    assert Instrument.from_yaml(inst.to_yaml()) == inst
    for bad in (
        {"detector_mask_rows": [200]},
        {"detector_mask_pixels": [[1]]},
        {"detector_saturation_counts": -1},
        {"beam_centre_offset_px": [1]},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Instrument(**bad)


# ---------------------------------------------------------------------------- orientation
def test_a_flipped_detector_described_correctly_gives_the_same_numbers(predictor):
    rng = np.random.default_rng(8)
    params = random_parameters(INSTRUMENT, 40, rng)
    raw = rng.poisson(7.0 / 4 * simulate_roi(*params.T)).astype(np.uint16)  # physics.md's frame
    reference = predictor.predict(raw)
    for mounting in ({"detector_flip_cols": True}, {"detector_flip_rows": True, "detector_transpose": True}):
        detector = INSTRUMENT.replace(**mounting)
        seen = raw.copy()
        if detector.detector_flip_cols:
            seen = seen[..., ::-1]
        if detector.detector_flip_rows:
            seen = seen[..., ::-1, :]
        if detector.detector_transpose:
            seen = np.swapaxes(seen, -1, -2)
        with pytest.raises(InstrumentMismatchError, match="detector_flip"):
            predictor.predict(seen, instrument=detector)  # the model's detector is not mounted so
        ds = predictor.for_detector(detector).predict(seen)
        for p in PARAMS:
            np.testing.assert_allclose(ds[p].values, reference[p].values, rtol=0, atol=1e-9)
        unflipped = predictor.predict(seen, instrument=detector, allow_instrument_mismatch=True)
        np.testing.assert_allclose(unflipped["strain"].values, reference["strain"].values, atol=1e-9)
        # Described wrongly, the frames are mirror images: omega comes out wrong (a mirror image is
        # nearly a valid frame of other parameters, so no check can tell; describe the detector).
        wrong = predictor.predict(seen)
        assert np.nanmax(np.abs(wrong["omega"].values - reference["omega"].values)) > 0.01
    with pytest.raises(InstrumentMismatchError, match="physics differs"):
        predictor.for_detector(INSTRUMENT.replace(detector_distance_m=1.0))


def _flipped_raw_scan(rng, n=24):
    params = random_parameters(INSTRUMENT, n, rng)
    raw = rng.poisson(7.0 / 4 * simulate_roi(*params.T)).astype(np.uint16)
    return raw, np.ascontiguousarray(raw[..., ::-1])  # as physics.md has it; as a mirrored detector


def test_the_live_callback_orients_raw_rois_with_the_run_instrument(predictor):
    from event_model import compose_run

    from nanobeam_bluesky.callbacks import NanobeamCallback

    raw, seen = _flipped_raw_scan(np.random.default_rng(10))
    detector = INSTRUMENT.replace(detector_flip_cols=True)
    rows = {}
    for frames, start_md, model in (
        (raw, {}, predictor),
        (seen, {"nanobeam_instrument": detector.to_dict()}, predictor.for_detector(detector)),
    ):
        callback = NanobeamCallback(model)
        pages = []
        callback.subscribe(lambda name, doc, pages=pages: pages.append(doc) if name == "event_page" else None)
        bundle = compose_run(metadata=start_md)
        callback("start", bundle.start_doc)
        key = {"source": "sim", "dtype": "array", "shape": [128, 128], "dtype_numpy": "<u2"}
        desc = bundle.compose_descriptor(name="primary", data_keys={"image": key})
        callback("descriptor", desc.descriptor_doc)
        n = len(frames)
        callback(
            "event_page",
            desc.compose_event_page(
                data={"image": list(frames)},
                timestamps={"image": [0.0] * n},
                seq_num=list(range(1, n + 1)),
                time=[0.0] * n,
                validate=False,
            ),
        )
        callback("stop", bundle.compose_stop())
        assert callback.flush(timeout=60)
        callback.close()
        keys = ("strain", "omega", "fit_quality", "flag")
        rows[len(rows)] = {k: np.concatenate([p["data"][k] for p in pages]) for k in keys}
    for key in keys:
        np.testing.assert_allclose(rows[1][key], rows[0][key], rtol=0, atol=1e-9)


def test_the_fits_orient_raw_rois_with_the_data_instrument():
    from nanobeam_bluesky.fitting import LikelihoodFitter

    raw, seen = _flipped_raw_scan(np.random.default_rng(11), n=8)
    fitter = LikelihoodFitter.from_instrument(INSTRUMENT, 9, progress=False)
    reference = fitter.fit(raw)
    mirrored = fitter.fit(seen, instrument=INSTRUMENT.replace(detector_flip_cols=True))
    for key in (*PARAMS, "fit_quality", "flag"):
        np.testing.assert_allclose(mirrored[key].values, reference[key].values, rtol=0, atol=1e-9)


def test_live_maps_grey_out_flagged_points(workdir):
    from event_model import compose_run

    from nanobeam_bluesky.callbacks import LiveStrainMaps

    maps = LiveStrainMaps(workdir, shape=(2, 2), redraw_period_s=0.0)
    bundle = compose_run(metadata={"shape": [2, 2]})
    maps("start", bundle.start_doc)
    keys = {k: {"source": "x", "dtype": "number", "shape": []} for k in (*PARAMS, "flag")}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    maps("descriptor", desc.descriptor_doc)
    data = {
        "strain": [1e-3, 2e-3, 3e-3, 4e-3],
        "omega": [0.01] * 4,
        "chi": [0.0] * 4,
        "flag": [0, int(Flag.POOR_FIT), 0, 0],
    }
    maps(
        "event_page",
        desc.compose_event_page(
            data=data, timestamps={k: [0.0] * 4 for k in data}, seq_num=[1, 2, 3, 4], time=[0.0] * 4
        ),
    )
    maps("stop", bundle.compose_stop())
    assert maps.flagged == 1
    assert np.isnan(maps.maps["strain"][0, 1]) and np.isfinite(maps.maps["strain"]).sum() == 3
    assert maps.saved and maps.saved[0].exists()


def test_a_free_film_absorbs_another_energy_and_the_pooled_film_catches_it():
    """The likelihood step with the film fitted (what a model that predicts the film does) on the
    film at 10.8 keV (the instrument says 11.3): every frame fits as well as the truth would, the
    film reads ~5 A thinner -- and the pooled film, more than 3 % off the instrument's, is a
    mismatch. At the instrument's energy the same pooling passes."""
    rng = np.random.default_rng(21)
    check = PhysicsCheck.for_instrument(INSTRUMENT)
    verdicts = {}
    for energy in (11.3, 10.8):
        frames = _ideal(150, rng, INSTRUMENT, energy=energy)
        result = check(frames.counts, frames.params, thickness=np.full(150, 117.0))
        assert np.isfinite(result.thickness).all() and (result.thickness_err < 3.0).all()
        assert np.mean(result.flags != 0) < 0.05  # single frames cannot tell
        pool = PooledConsistency(nominal_angstrom=117.0)
        pool.add(result)
        film, sd = pool.thickness_estimate(117.0)
        verdicts[energy] = (pool.mismatch, film, sd)
    assert not verdicts[11.3][0] and abs(verdicts[11.3][1] - 117.0) < 5 * verdicts[11.3][2] + 0.5
    assert verdicts[10.8][0] and verdicts[10.8][1] < 117.0 * (1 - 0.03), verdicts[10.8]
