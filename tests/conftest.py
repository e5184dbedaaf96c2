"""Shared fixtures: the model under test (shipped if present, else a tiny one, cached) and a phantom."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nanobeam_bluesky.inference import Predictor, load_pretrained
from nanobeam_bluesky.phantoms import Phantom

#: A tiny ensemble (2 members, 64-64 MLP, a few thousand frames): trains in about a minute on 2
#: busy cores, then comes from pytest's cache. Accurate enough to map a phantom recognisably.
TINY_RECIPE_CHANGES = {
    "epochs": 3,
    "frames_per_epoch": 4096,
    "pool_size": 2048,
    "validation_frames": 256,
    "upsample": 4,
    "architecture_kwargs": {"hidden": (64, 64)},
}


@dataclass(frozen=True)
class ModelUnderTest:
    predictor: Predictor
    #: The model file (for subprocesses such as ``nanobeam listen``); None for the shipped model.
    path: Path | None
    #: True for the shipped pretrained model, whose metadata states its accuracy.
    shipped: bool


def _tiny_model_path(cache_dir: Path) -> Path:
    import nanobeam_bluesky.training as training

    sources = sorted(Path(training.__file__).parent.glob("*.py"))
    digest = hashlib.sha256(json.dumps(TINY_RECIPE_CHANGES, sort_keys=True).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return cache_dir / f"tiny-{digest.hexdigest()[:16]}.pt"


@pytest.fixture(scope="session")
def model(request: pytest.FixtureRequest) -> ModelUnderTest:
    """The shipped model when it exists; else a tiny ensemble trained once and cached by pytest."""
    try:
        return ModelUnderTest(load_pretrained(), None, True)
    except FileNotFoundError:
        pass
    from nanobeam_bluesky.training import DEFAULT_RECIPE, train_ensemble

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    cache_dir = Path(cache.mkdir("nanobeam-tiny-model")) if cache is not None else Path(tempfile.mkdtemp())
    path = _tiny_model_path(cache_dir)
    if not path.exists():
        for old in cache_dir.glob("tiny-*.pt"):
            old.unlink()
        partial = path.with_suffix(".partial")
        train_ensemble(DEFAULT_RECIPE.replace(**TINY_RECIPE_CHANGES), 2, partial, progress=False)
        partial.rename(path)
    return ModelUnderTest(Predictor.from_file(path), path, False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory removed after the test (HDF5 files, PNGs)."""
    path = Path(tempfile.mkdtemp(prefix="nanobeam-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_phantom(n: int = 8, pixel_size_um: float = 0.1) -> Phantom:
    """An n x n sample whose maps each span most of their parameter range.

    Strain: domains (a product of sinusoids); omega: a substrate step along x; chi: a ramp along y.
    """
    v, u = np.mgrid[0:n, 0:n] / max(n - 1, 1)
    strain = 0.004 * np.sin(2 * np.pi * u) * np.cos(np.pi * v)
    omega = 0.04 * np.tanh(6 * (u - 0.5))
    chi = 0.16 * (v - 0.5)
    return Phantom(strain, omega, chi, pixel_size_um=pixel_size_um, description="test phantom")


@pytest.fixture(scope="session")
def phantom() -> Callable[..., Phantom]:
    """make_phantom(n=8, pixel_size_um=0.1) -> Phantom."""
    return make_phantom


#: Test modules that run real processes and services (a Tiled server, the RunEngine with devices,
#: 0MQ, subprocesses): "integration". Everything else is "unit" (``pytest -m unit``: < 1 minute).
INTEGRATION_MODULES = {
    "test_browser",
    "test_callbacks",
    "test_databroker",
    "test_demo",
    "test_listen",
    "test_outage",
    "test_readers",
    "test_readme",
    "test_security",
    "test_streaming",
    "test_tiled",
    "test_train_command",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        item.add_marker(pytest.mark.integration if module in INTEGRATION_MODULES else pytest.mark.unit)
