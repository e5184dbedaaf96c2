"""`nanobeam serve` serves only what is declared: each escape tried against a real server process.

One server (loopback, API key) serves a scan directory holding HDF5 files that reach outside it
(an external link, a virtual dataset, external raw storage, and a soft link that stays inside),
TIFF frames, positions files and directories that are symlinks out of it (and one that stays
inside), and two catalogs into which the tests register assets that leave the declared directories
(a symlink, ``..``) or name an instrument by path. Every escape must answer with a one-line HTTP
error naming the problem, be logged by the server, and leave the server running. The API-key
length and the model file's sha256 (weights and metadata) are unit-tested.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from nanobeam_bluesky.formats import MdaFile, MdaPositioner, MdaScan, write_mda
from nanobeam_bluesky.phantoms import fig3_phantom
from nanobeam_bluesky.physics import Instrument, InstrumentError, grid_axes, simulate
from nanobeam_bluesky.scanfile import simulate_scan_file
from nanobeam_bluesky.tiled.adapters import (
    INSTRUMENT_MIMETYPE,
    SCAN_MIMETYPE,
    ExperimentalScanAdapter,
    LazyLibraryAdapter,
    RefusedError,
    ScanDirectoryAdapter,
    named_instrument,
)
from nanobeam_bluesky.tiled.adapters._guard import hdf5_refusal, open_hdf5
from nanobeam_bluesky.tiled.server import (
    API_KEY_ENV,
    MIN_API_KEY_LENGTH,
    ServerConfig,
    TiledServer,
    check_api_key,
    free_port,
)

WORKTREE = Path(__file__).resolve().parents[1]
SECRET = 4242  # every value of the secret frames: seeing it served means an escape
FRAMES = (2, 8, 8)
#: A file the server must never show: its key names and values must not reach a client.
SECRET_YAML = "password_hash: hunter2\nenergy_kev: 11.3\n"
#: HDF5 escapes in the scan directory: file name -> words the refusal must contain.
HDF5_ESCAPES = {
    "external_link.h5": "external link",
    "virtual.h5": "virtual dataset",
    "external_raw.h5": "external raw files",
}


def _positions(h5: h5py.File) -> None:
    h5["/entry/data/x_um"] = np.arange(FRAMES[0], dtype=float)
    h5["/entry/data/y_um"] = np.zeros(FRAMES[0])


#: TIFF directories in the scan directory with a file that is a symlink out: directory -> the file.
TIFF_ESCAPES = {"tiff_escape": "scan_2.tif", "positions_escape": "positions.csv"}


def _beamline_escapes(outside: Path, scans: Path) -> None:
    """TIFF frames, a positions CSV, an MDA file and a directory of TIFFs outside the scan
    directory, each reached through a symlink from inside it; and a symlink that stays inside."""
    import tifffile

    frame = np.full(FRAMES[1:], SECRET, dtype="u2")
    tifffile.imwrite(outside / "secret.tif", frame)
    (outside / "secret.csv").write_text(f"x_um,y_um\n{SECRET},{SECRET}\n{SECRET},{SECRET}\n")
    x = MdaPositioner(1, "m1", "m1", "um", "m1.RBV", "m1", "um", np.full(3, float(SECRET)))
    write_mda(outside / "secret.mda", MdaFile(1.4, SECRET, 1, (3,), MdaScan(1, 3, 3, [x], [])))
    (outside / "tiffs").mkdir()
    tifffile.imwrite(outside / "tiffs" / "scan_1.tif", frame)
    for name in (*TIFF_ESCAPES, "tiff_inside"):
        (scans / name).mkdir()
        for i in (1, 2):
            tifffile.imwrite(scans / name / f"scan_{i}.tif", np.full(FRAMES[1:], i, dtype="u2"))
    (scans / "tiff_escape" / "scan_2.tif").unlink()
    (scans / "tiff_escape" / "scan_2.tif").symlink_to(outside / "secret.tif")
    (scans / "positions_escape" / "positions.csv").symlink_to(outside / "secret.csv")
    (scans / "tiff_inside" / "scan_3.tif").symlink_to(scans / "tiff_escape" / "scan_1.tif")  # inside: served
    (scans / "link_outside.mda").symlink_to(outside / "secret.mda")
    (scans / "dir_outside").symlink_to(outside / "tiffs", target_is_directory=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    outside = root / "outside"  # never declared
    outside.mkdir()
    secret_h5 = outside / "secret.h5"
    with h5py.File(secret_h5, "w") as h5:
        h5["/entry/data/data"] = np.full(FRAMES, SECRET, dtype="u2")
        _positions(h5)
    secret_raw = outside / "secret.raw"
    secret_raw.write_bytes(np.full(FRAMES, SECRET, dtype="<u2").tobytes())
    (outside / "secret.yaml").write_text(SECRET_YAML)

    scans = root / "scans"
    scans.mkdir()
    simulate_scan_file(scans / "good.h5", fig3_phantom((2, 2)), rng=1)
    with h5py.File(scans / "external_link.h5", "w") as h5:
        h5["/entry/data/data"] = h5py.ExternalLink(str(secret_h5), "/entry/data/data")
        _positions(h5)
    with h5py.File(scans / "virtual.h5", "w") as h5:
        layout = h5py.VirtualLayout(shape=FRAMES, dtype="u2")
        layout[:] = h5py.VirtualSource(str(secret_h5), "/entry/data/data", shape=FRAMES)
        h5.create_virtual_dataset("/entry/data/data", layout)
        _positions(h5)
    with h5py.File(scans / "external_raw.h5", "w") as h5:
        h5.create_dataset(
            "/entry/data/data",
            shape=FRAMES,
            dtype="<u2",
            external=[(str(secret_raw), 0, secret_raw.stat().st_size)],
        )
        _positions(h5)
    with h5py.File(scans / "soft_link.h5", "w") as h5:  # a link inside the file: served
        h5["/entry/raw/frames"] = np.full(FRAMES, 7, dtype="u2")
        h5["/entry/data/data"] = h5py.SoftLink("/entry/raw/frames")
        _positions(h5)
    (scans / "link_outside.h5").symlink_to(secret_h5)
    for name in HDF5_ESCAPES:  # the escapes are real: plain h5py reads the secret through them
        with h5py.File(scans / name, "r") as h5:
            assert (h5["/entry/data/data"][()] == SECRET).all()

    _beamline_escapes(outside, scans)

    detector = root / "detector"  # a declared readable directory
    detector.mkdir()
    with h5py.File(detector / "generic.h5", "w") as h5:  # for tiled's own HDF5 adapter
        h5["counts"] = np.arange(4)
        h5["leak"] = h5py.ExternalLink(str(secret_h5), "/entry/data/data")
    Instrument().save(detector / "asset.yaml")

    instruments = root / "instruments"
    instruments.mkdir()
    Instrument(energy_kev=10.8).save(instruments / "beamline.yaml")
    (instruments / "broken.yaml").write_text(SECRET_YAML)  # not an instrument: its keys stay hidden
    (instruments / "escape.yaml").symlink_to(outside / "secret.yaml")
    return {
        "root": root,
        "outside": outside,
        "scans": scans,
        "detector": detector,
        "instruments": instruments,
        "secret_h5": secret_h5,
    }


@pytest.fixture(scope="module")
def server(workspace):
    config = ServerConfig(
        data_dir=workspace["root"] / "tiled",
        lazy_library=False,
        scans=workspace["scans"],
        readable=(workspace["detector"],),
        instruments=workspace["instruments"],
        port=free_port(),
    )
    srv = TiledServer(config, env={"PYTHONPATH": str(WORKTREE)})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.alive()


@pytest.fixture(scope="module")
def files(server):
    return server.client("files")


def _client_error(call):
    from tiled.client.utils import ClientError

    with pytest.raises(ClientError) as info:
        call()
    return info.value


def _register(files, key: str, data_uri: str, mimetype: str, like_adapter, parameters=None):
    """Create a catalog node whose asset is ``data_uri`` (structure taken from a good adapter):
    what a client holding the API key can do without ``tiled register``'s local checks."""
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management

    structure = like_adapter.structure()
    files.new(
        StructureFamily.container,
        [
            DataSource(
                structure_family=StructureFamily.container,
                mimetype=mimetype,
                structure=structure,
                parameters=parameters or {},
                management=Management.external,
                assets=[Asset(data_uri=data_uri, is_directory=False, parameter="data_uri")],
            )
        ],
        key=key,
    )


def _assert_nothing_leaked(error, workspace) -> None:
    detail = error.response.json()["detail"]  # what the client is told (one line)
    for word in ("hunter2", "password_hash", str(workspace["outside"]), str(SECRET)):
        assert word not in detail, (word, detail)
    assert "\n" not in detail


# ---------------------------------------------------------------------------------- HDF5
def test_hdf5_links_to_other_files_are_refused_and_logged(server, workspace):
    scans = server.client("scans")
    listing = dict(scans.items())
    for name, problem in HDF5_ESCAPES.items():
        assert problem in listing[name].metadata["error"]  # listed with its error, never read
        error = _client_error(lambda name=name: scans[name])
        assert error.response.status_code == 403
        detail = error.response.json()["detail"]
        assert name in detail and problem in detail and "/entry/data/data" in detail, detail
        _assert_nothing_leaked(error, workspace)
        assert f"{name}: refused: /entry/data/data" in server.log_tail(200)  # logged
    assert "link_outside.h5" not in listing  # a symlink leaving the directory is not listed
    # A soft link inside the file is fine; the server carries on serving.
    np.testing.assert_array_equal(scans["soft_link.h5"]["frames"].read(), np.full(FRAMES, 7))
    assert scans["good.h5"]["frames"].shape == (2, 2, 256, 256)
    assert server.alive()


def test_tiff_and_mda_files_leading_out_of_the_scan_directory_are_refused(server, workspace):
    scans = server.client("scans")
    listing = dict(scans.items())
    # An MDA file or a directory of TIFFs that is a symlink out is not listed, nor served.
    for name in ("link_outside.mda", "dir_outside"):
        assert name not in listing
        with pytest.raises(KeyError):
            scans[name]
    # A TIFF frame or positions file of a scan that leads out: the scan is listed with its error,
    # and refused (403), naming the file, never its target.
    for name, file in TIFF_ESCAPES.items():
        assert "resolves outside" in listing[name].metadata["error"]
        error = _client_error(lambda name=name: scans[name])
        assert error.response.status_code == 403
        detail = error.response.json()["detail"]
        assert f"{name}: refused: {file} resolves outside" in detail, detail
        _assert_nothing_leaked(error, workspace)
        assert f"{name}: refused: {file}" in server.log_tail(200)  # logged, with the target
    # A symlink that stays inside the directory is served; the server carries on.
    frames = scans["tiff_inside"]["frames"].read()
    np.testing.assert_array_equal(frames, np.stack([np.full(FRAMES[1:], v) for v in (1, 2, 1)]))
    assert server.alive()


def test_tileds_own_hdf5_adapter_is_checked_too(files, workspace):
    from tiled.adapters.hdf5 import HDF5Adapter

    path = workspace["detector"] / "generic.h5"
    _register(files, "generic", path.as_uri(), "application/x-hdf5", HDF5Adapter.from_uris(path.as_uri()))
    error = _client_error(lambda: files["generic"]["counts"])  # the adapter is built on access
    assert error.response.status_code == 403 and "/leak is an HDF5 external link" in str(error)
    _assert_nothing_leaked(error, workspace)


def test_hdf5_refusal_names_the_object_and_opens_nothing_outside(workspace):
    for name, problem in HDF5_ESCAPES.items():
        with h5py.File(workspace["scans"] / name, "r") as h5:
            found, detail = hdf5_refusal(h5)
        assert found.startswith("/entry/data/data") and problem in found
        assert "secret" in detail  # the server log names the target; the client's message does not
        with pytest.raises(RefusedError, match=problem):
            ExperimentalScanAdapter.from_path(workspace["scans"] / name)
    with open_hdf5(workspace["scans"] / "soft_link.h5") as h5:
        assert h5["/entry/data/data"][0, 0, 0] == 7


# ---------------------------------------------------------------------------------- paths
@pytest.mark.parametrize(
    ("key", "where", "mimetype"),
    [
        ("symlink", "scans/link_outside.h5", SCAN_MIMETYPE),  # inside a declared directory, links out
        ("dotdot", "detector/../outside/secret.h5", SCAN_MIMETYPE),
        ("dotdot_tiled_hdf5", "detector/../outside/secret.h5", "application/x-hdf5"),
    ],
)
def test_catalog_assets_resolving_outside_the_declared_directories_are_refused(
    server, files, workspace, key, where, mimetype
):
    good = workspace["scans"] / "good.h5"
    like = ExperimentalScanAdapter.from_path(good)
    if mimetype == "application/x-hdf5":
        from tiled.adapters.hdf5 import HDF5Adapter

        like = HDF5Adapter.from_uris(workspace["secret_h5"].as_uri())
    _register(files, key, f"file://{workspace['root']}/{where}", mimetype, like)
    child = "counts" if mimetype == "application/x-hdf5" else "frames"
    error = _client_error(lambda: files[key][child])
    assert error.response.status_code == 403
    assert "resolves outside the server's declared directories" in str(error), str(error)
    _assert_nothing_leaked(error, workspace)
    assert "resolves outside" in server.log_tail(200)
    assert server.alive()


# ---------------------------------------------------------------------------------- instrument
@pytest.mark.parametrize(
    ("key", "instrument", "problem"),
    [
        ("absolute", "{outside}/secret.yaml", "never as a path"),
        ("relative", "../outside/secret", "never as a path"),
        ("escape", "escape", "no valid instrument config named 'escape'"),  # a symlink out of the dir
        ("broken", "broken", "no valid instrument config named 'broken'"),  # exists, no instrument
        ("unknown", "nope", "no valid instrument config named 'nope'"),
    ],
)
def test_instrument_parameter_takes_names_never_paths(files, workspace, key, instrument, problem):
    instrument = instrument.format(outside=workspace["outside"])
    asset = (workspace["detector"] / "asset.yaml").as_uri()
    like = LazyLibraryAdapter.from_instrument(None, grid_points=3)
    _register(files, key, asset, INSTRUMENT_MIMETYPE, like, {"instrument": instrument, "grid_points": 3})
    error = _client_error(lambda: files[key]["frames"])
    assert error.response.status_code == 422 and problem in str(error), str(error)
    _assert_nothing_leaked(error, workspace)
    # Scan files take the same parameter.
    good = (workspace["scans"] / "good.h5").as_uri()
    _register(
        files,
        key + "-scan",
        good,
        SCAN_MIMETYPE,
        ExperimentalScanAdapter.from_path(workspace["scans"] / "good.h5"),
        {"instrument": instrument},
    )
    error = _client_error(lambda: files[key + "-scan"]["frames"])
    assert error.response.status_code == 422 and problem in str(error), str(error)


def test_instrument_names_resolve_in_the_configured_directory(files, workspace):
    like = LazyLibraryAdapter.from_instrument(None, grid_points=3)
    asset = (workspace["detector"] / "asset.yaml").as_uri()
    _register(files, "named", asset, INSTRUMENT_MIMETYPE, like, {"instrument": "beamline", "grid_points": 3})
    beamline = Instrument(energy_kev=10.8)
    axes = grid_axes(beamline, 3)
    expected = simulate(axes["strain"][1], axes["omega"][2], axes["chi"][0], beamline)[0]
    np.testing.assert_array_equal(files["named"]["frames"][1, 2, 0], expected)
    assert not np.array_equal(expected, simulate(axes["strain"][1], axes["omega"][2], axes["chi"][0])[0])
    # Unknown registration parameters are refused by name, not passed on.
    _register(files, "extra", asset, INSTRUMENT_MIMETYPE, like, {"instrument_dir": "/"})
    error = _client_error(lambda: files["extra"]["frames"])
    assert error.response.status_code == 422 and "instrument_dir" in str(error)


def test_adapters_never_open_an_instrument_path(workspace, caplog):
    secret = str(workspace["outside"] / "secret.yaml")
    for call in (
        lambda: LazyLibraryAdapter.from_instrument(secret),
        lambda: ScanDirectoryAdapter.from_directory(workspace["scans"], instrument=secret),
        lambda: named_instrument(Path(secret)),
    ):
        with pytest.raises(InstrumentError, match="never as a path"):
            call()
    assert named_instrument("beamline", workspace["instruments"]).energy_kev == 10.8
    assert named_instrument("default") == Instrument() == named_instrument(None)
    with caplog.at_level(logging.WARNING, logger="nanobeam_bluesky.serve"):
        with pytest.raises(InstrumentError) as info:
            named_instrument("broken", workspace["instruments"])
    assert "password_hash" not in str(info.value) and "password_hash" in caplog.text  # the log tells
    with pytest.raises(InstrumentError, match="no valid instrument"):
        named_instrument("beamline")  # no directory configured


# ---------------------------------------------------------------------------------- API key
def test_short_api_keys_are_refused(tmp_path, monkeypatch, capsys):
    from nanobeam_bluesky.cli import main

    assert check_api_key("a" * MIN_API_KEY_LENGTH) == "a" * MIN_API_KEY_LENGTH
    with pytest.raises(ValueError, match=f"at least {MIN_API_KEY_LENGTH}"):
        check_api_key("x")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = ["serve", "--data-dir", str(tmp_path), "--port", str(free_port())]
    assert main([*args, "--api-key", "x"]) == 2
    error = capsys.readouterr().err.strip()
    assert "at least 16" in error and "openssl rand" in error and "\n" not in error
    monkeypatch.setenv(API_KEY_ENV, "short1234")
    assert main(args) == 2
    assert "(9 characters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 16"):
        TiledServer(ServerConfig(data_dir=tmp_path), api_key="abc")
    assert not (tmp_path / "config.yml").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------- model file
def _tiny_file(path: Path) -> str:
    from nanobeam_bluesky.models import NanobeamMLP, save_model_file

    torch.manual_seed(0)
    meta = {"model_id": "t", "output_normalisation": {"centre": [0.0, 0.0, 0.0], "half_range": [1, 1, 1]}}
    return save_model_file(path, [NanobeamMLP(hidden=(8,)).state_dict()], meta)


def test_model_file_sha256_covers_weights_and_metadata(tmp_path):
    from nanobeam_bluesky.models import ModelFileError, load_model_file, model_sha256, weights_sha256

    sha = _tiny_file(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["format_version"] == 4
    metadata = json.loads(blob["metadata"])
    assert metadata["sha256"] == sha == model_sha256(blob["members"], metadata)
    assert sha != weights_sha256(blob["members"])
    # An edited metadata value (the output scale) no longer matches.
    metadata["output_normalisation"]["half_range"][0] = 2
    torch.save({**blob, "metadata": json.dumps(metadata)}, tmp_path / "edited.pt")
    with pytest.raises(ModelFileError, match="weights or metadata do not match"):
        load_model_file(tmp_path / "edited.pt")
    # So does an edited weight.
    members = [{k: v.clone() for k, v in m.items()} for m in blob["members"]]
    members[0]["layers.0.bias"][0] += 1
    torch.save({**blob, "members": members}, tmp_path / "weights.pt")
    with pytest.raises(ModelFileError, match="sha256"):
        load_model_file(tmp_path / "weights.pt")


def test_old_model_files_load_with_a_note(tmp_path, caplog):
    from nanobeam_bluesky.models import ModelFileError, load_model_file, weights_sha256

    _tiny_file(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    metadata = json.loads(blob["metadata"]) | {"sha256": weights_sha256(blob["members"])}
    for version in (1, 2, 3):  # as those versions wrote them: the weights' sha256 only
        torch.save({**blob, "format_version": version, "metadata": json.dumps(metadata)}, tmp_path / "old.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nanobeam_bluesky.models.modelfile"):
            states, loaded = load_model_file(tmp_path / "old.pt")
        assert loaded["sha256"] == metadata["sha256"] and len(states) == 1
        assert "covers the weights only" in caplog.text
    members = [{k: v.clone() for k, v in m.items()} for m in blob["members"]]
    members[0]["layers.0.bias"][0] += 1
    torch.save(
        {**blob, "format_version": 3, "members": members, "metadata": json.dumps(metadata)},
        tmp_path / "old-edited.pt",
    )
    with pytest.raises(ModelFileError, match="weights do not match"):
        load_model_file(tmp_path / "old-edited.pt")


def test_shipped_model_file_is_format_4_and_verified():
    from nanobeam_bluesky.inference import PRETRAINED_FILE
    from nanobeam_bluesky.models import load_model_file, model_sha256

    path = WORKTREE / "nanobeam_bluesky" / "pretrained" / PRETRAINED_FILE
    if not path.exists():
        pytest.skip("no shipped model in this checkout")
    blob = torch.load(path, weights_only=True)
    assert blob["format_version"] == 4
    _, metadata = load_model_file(path)
    assert metadata["sha256"] == model_sha256(blob["members"], metadata)
