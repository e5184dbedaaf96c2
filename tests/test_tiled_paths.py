"""The Tiled code lives in ``nanobeam_bluesky.tiled``; the old module paths keep working.

Server config files written by earlier versions name the adapters by their old dotted paths
(``nanobeam_bluesky.tiled_adapters:contained_catalog``, ...); tiled imports them when the server
starts, so they must resolve to the very objects the new paths name. Also: errors become HTTP
errors in one place (``nanobeam_bluesky.tiled._http``), with the statuses the server tests see.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import Any

import pytest
from tiled.utils import import_object

import nanobeam_bluesky.tiled as tiled_pkg
from nanobeam_bluesky.errors import InputError, NanobeamError
from nanobeam_bluesky.tiled.server import API_KEY_ENV, ServerConfig, ensure_catalog, write_server_config

#: Old module -> the module it moved to.
MOVED = {
    "nanobeam_bluesky.tiled_adapters": "nanobeam_bluesky.tiled.adapters",
    "nanobeam_bluesky.tiled_adapters.scans": "nanobeam_bluesky.tiled.adapters.scans",
    "nanobeam_bluesky.tiled_adapters.library": "nanobeam_bluesky.tiled.adapters.library",
    "nanobeam_bluesky.tiled_adapters.mimetypes": "nanobeam_bluesky.tiled.adapters.mimetypes",
    "nanobeam_bluesky.tiled_server": "nanobeam_bluesky.tiled.server",
    "nanobeam_bluesky.tiled_catalog": "nanobeam_bluesky.tiled.catalog",
    "nanobeam_bluesky.tiled_spool": "nanobeam_bluesky.tiled.spool",
    "nanobeam_bluesky.replay": "nanobeam_bluesky.tiled.replay",
}
NEW_ADAPTERS = "nanobeam_bluesky.tiled.adapters:"
OLD_ADAPTERS = "nanobeam_bluesky.tiled_adapters:"


def _dotted_paths(value: Any) -> list[str]:
    """Every ``module:object`` string of ours in a (nested) server config."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _dotted_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _dotted_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("nanobeam_bluesky") else []


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_modules_reexport_the_same_objects(old):
    old_module, new_module = importlib.import_module(old), importlib.import_module(MOVED[old])
    assert old_module.__all__ and "moved to" in old_module.__doc__.lower()
    for name in old_module.__all__:
        assert getattr(old_module, name) is getattr(new_module, name), (old, name)


def test_old_dotted_paths_of_earlier_server_configs_resolve_to_the_new_objects(tmp_path):
    from nanobeam_bluesky.tiled import server_config

    (tmp_path / "scans").mkdir()
    library = tmp_path / "library.h5"
    library.touch()
    config = server_config(
        ServerConfig(data_dir=tmp_path / "data", scans=tmp_path / "scans", library=library)
    )
    # The trees' adapters moved (the live page's router is new: it never had an old path).
    paths = _dotted_paths(config["trees"])
    assert _dotted_paths(config["routers"]) == ["nanobeam_bluesky.tiled.web:router"]
    assert {p.split(":")[1] for p in paths} >= {
        "contained_catalog",
        "SimulatedLibraryAdapter",
        "ExperimentalScanAdapter",
        "LazyLibraryAdapter",
        "SimulatedLibraryAdapter.from_path",
        "LazyLibraryAdapter.from_instrument",
        "ScanDirectoryAdapter.from_directory",
    }
    assert all(p.startswith(NEW_ADAPTERS) for p in paths), paths  # new configs name the new paths
    for new in paths:
        old = new.replace(NEW_ADAPTERS, OLD_ADAPTERS)
        # == and not `is`: each access to a classmethod makes a new (equal) bound method
        assert import_object(old) == import_object(new), old
    # what earlier versions wrote by hand or in docs: the submodules, by their old paths
    assert import_object(
        "nanobeam_bluesky.tiled_adapters.scans:ExperimentalScanAdapter.from_uris"
    ) == import_object("nanobeam_bluesky.tiled.adapters:ExperimentalScanAdapter.from_uris")
    assert import_object("nanobeam_bluesky.tiled_adapters.mimetypes:detect_mimetype") is import_object(
        "nanobeam_bluesky.tiled.adapters:detect_mimetype"
    )


# `tiled catalog init` (alembic) warns about its own config
@pytest.mark.filterwarnings("ignore:No path_separator found:DeprecationWarning")
def test_a_config_written_by_an_earlier_version_builds_the_same_trees(tmp_path, monkeypatch):
    from tiled.config import parse_configs

    from nanobeam_bluesky.tiled.adapters import (
        ExperimentalScanAdapter,
        LazyLibraryAdapter,
        ScanDirectoryAdapter,
    )

    (tmp_path / "scans").mkdir()
    config = ServerConfig(data_dir=tmp_path / "data", scans=tmp_path / "scans")
    path = write_server_config(config)
    path.write_text(path.read_text().replace(NEW_ADAPTERS, OLD_ADAPTERS))
    assert NEW_ADAPTERS not in path.read_text()
    ensure_catalog(config.catalog_database())
    ensure_catalog(config.files_database())
    monkeypatch.setenv(API_KEY_ENV, "k" * 32)
    trees = parse_configs(path).merged_trees
    assert isinstance(trees["simulated"], LazyLibraryAdapter)
    assert isinstance(trees["scans"], ScanDirectoryAdapter)
    scan_adapter = trees["runs"].context.adapters_by_mimetype["application/x-nanobeam-scan+hdf5"]
    assert issubclass(scan_adapter, ExperimentalScanAdapter)  # wrapped by contained_catalog


def test_the_package_reexports_every_name_it_lists():
    listed = [name for names in tiled_pkg._MODULES.values() for name in names]
    assert sorted(listed) == sorted(tiled_pkg.__all__) and len(set(listed)) == len(listed)
    for module, names in tiled_pkg._MODULES.items():
        source = importlib.import_module(module, tiled_pkg.__name__)
        for name in names:
            assert getattr(tiled_pkg, name) is getattr(source, name), name
    with pytest.raises(AttributeError):
        tiled_pkg.no_such_name  # noqa: B018


def test_the_run_catalog_is_imported_without_the_adapters():
    code = (
        "import sys; from nanobeam_bluesky.tiled import derived_runs, SpooledTiledWriter; "
        "print('nanobeam_bluesky.tiled.adapters' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out


def test_errors_become_http_errors_in_one_place():
    from fastapi import HTTPException

    from nanobeam_bluesky.physics import InstrumentError
    from nanobeam_bluesky.scanfile import ScanFileError
    from nanobeam_bluesky.tiled import DataError, RefusedError
    from nanobeam_bluesky.tiled._http import http_error, served_errors

    assert issubclass(DataError, InputError) and issubclass(RefusedError, DataError)
    assert issubclass(DataError, NanobeamError) and issubclass(DataError, ValueError)
    cases = [
        (RefusedError("scan.h5: refused: outside"), 403, "frames: scan.h5: refused: outside"),
        (DataError("too large a request"), 422, "frames: too large a request"),
        (ScanFileError("bad.h5: truncated"), 422, "frames: bad.h5: truncated"),
        (InstrumentError("no config named 'x'"), 422, "frames: no config named 'x'"),
        (KeyError("/entry/data missing"), 422, "frames: /entry/data missing"),
        (OSError("unable to open"), 422, "frames: unable to open"),
    ]
    for error, status, detail in cases:
        with pytest.raises(HTTPException) as info, served_errors("frames"):
            raise error
        assert (info.value.status_code, info.value.detail) == (status, detail), error
        assert info.value.__cause__ is error
    assert http_error(DataError("frames: x"), "frames").detail == "frames: x"  # named once
    with pytest.raises(TypeError), served_errors("frames"):  # a bug stays a bug (500)
        raise TypeError("bug")
    already = HTTPException(status_code=404, detail="gone")
    with pytest.raises(HTTPException) as info, served_errors("frames"):
        raise already
    assert info.value is already
