"""The README's examples run, so they cannot rot."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from nanobeam_bluesky.physics import Instrument

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_readme_opens_with_the_two_quickstart_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["./quickstart.sh demo", "./quickstart.sh test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./quickstart.sh test" in ci


def test_readme_instrument_yaml_is_the_example_file_and_valid():
    (block,) = _blocks("yaml")
    assert block == (ROOT / "docs" / "example-instrument.yaml").read_text()
    inst = Instrument.from_yaml(block)
    assert inst.effective_focal_length_m == pytest.approx(1.6e-4 * 2.0e-8 / (12.398 / 10.0 * 1e-10))
    assert inst.detector_flip_cols and inst.name == "my-beamline"


def test_readme_python_examples_run(model, tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace, from a scratch directory."""
    if not model.shipped:  # before a model ships, the examples run with the test model
        import nanobeam_bluesky

        monkeypatch.setattr(nanobeam_bluesky, "load_pretrained", lambda **_: model.predictor)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "example-instrument.yaml").write_text(
        (ROOT / "docs" / "example-instrument.yaml").read_text()
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() stays in here
    namespace: dict = {"__name__": "readme"}
    blocks = _blocks("python")
    assert len(blocks) >= 6
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # say which block broke
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}\n{code}") from exc
    # What the examples claim they did:
    assert len(namespace["rows"]) == 64 + 64 + 16  # step and fly scans, then the scan stored in Tiled
    assert namespace["again"].rows == 16
    assert os.path.exists("quick-model.pt")
    assert any(Path("maps").glob("*.png"))


def test_nothing_points_outside_the_repository():
    """Users have the repository, not the project's working notes: every pointer stays inside it."""
    texts = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    texts += [p.read_text() for p in (ROOT / "nanobeam_bluesky").rglob("*.py")]
    offenders = [t[:80] for t in texts if "shared/docs" in t or "../shared" in t]
    assert not offenders, offenders
    assert (ROOT / "docs" / "physics.md").exists()
