"""The model card: a model file's metadata, typed and validated once when the file loads.

Training writes the metadata as JSON (:func:`nanobeam_bluesky.training.model_metadata`); a
:class:`ModelCard` is what the rest of the package reads: every field it relies on is checked
here, so a file that lacks one is refused with the key's name instead of failing later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._schema import PARAMETERS
from ..physics import Instrument
from .modelfile import ModelFileError

__all__ = ["Architecture", "ModelCard", "ModelCardError", "RefinerCard"]


class ModelCardError(ModelFileError):
    """A model file's metadata lacks a field the package needs, or has the wrong kind of value."""


def _get(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ModelCardError(
                f"the model file's metadata has no {path!r}; it is not a nanobeam model "
                "file of this package's format (retrain it with `nanobeam train`)"
            )
        node = node[key]
    return node


def _floats(value: Any, path: str, n: int | None = None) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ModelCardError(f"the model file's {path!r} must be a list of numbers, got {value!r}") from None
    if n is not None and len(out) != n:
        raise ModelCardError(f"the model file's {path!r} must have {n} numbers, got {len(out)}")
    return out


@dataclass(frozen=True)
class Architecture:
    """A network's architecture: the name in ``models.ARCHITECTURES`` and its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Architecture:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ModelCardError(f"the model file's {path!r} must name an architecture, got {data!r}")
        return cls(data["name"], dict(data.get("kwargs") or {}))


@dataclass(frozen=True)
class RefinerCard:
    """The refining stage: registered networks predicting the tilts' (and, where the
    registration has ``pixels_per_strain``, the strain band's) sub-pixel rest."""

    architecture: Architecture
    n_members: int
    #: ``TiltRegistration`` keyword arguments (pixels per degree, largest shift).
    registration: dict[str, Any]
    #: Output scale of (omega, chi) residuals, in degrees[, and of the band's, in pixels].
    half_range: tuple[float, ...]

    @property
    def refines_strain(self) -> bool:
        return float(self.registration.get("pixels_per_strain", 0.0)) > 0


@dataclass(frozen=True)
class ModelCard:
    """Everything the package reads from a model file's metadata (units in the field names).

    Attributes:
        model_id, sha256: the model's name and the hash of its file's weights and metadata.
        architecture: the first stage's networks.
        instrument: the instrument it was trained for.
        parameter_ranges: the box it was trained on, per parameter (strain, deg, deg).
        output_centre, output_half_range: how the first stage's outputs map to physical units.
        frame_pixels: side of the binned frame it reads.
        max_counts: the training count level (counts of a fully lit pixel at the Laue maximum).
        count_augmentation: the training range of count levels, as factors of ``max_counts``.
        typical_frame_sum: sum of a noise-free frame at the box centre (Laue maximum 1), if stored.
        test_rmse, coarse_test_rmse: test RMSE (strain, deg, deg) of the whole model and of its
            first stage alone, NaN where not stored.
        refiner: the refining stage, if any.
        outputs: what the first stage predicts, in order: (strain, omega, chi), and "thickness"
            (Å) for a model trained on films of varying thickness.
        thickness_range_angstrom: the films it was trained on, for a model that predicts them.
        metadata: the metadata as stored (what derived runs record).
    """

    model_id: str
    sha256: str
    architecture: Architecture
    instrument: Instrument
    parameter_ranges: dict[str, tuple[float, float]]
    output_centre: tuple[float, ...]
    output_half_range: tuple[float, ...]
    frame_pixels: int
    max_counts: float
    count_augmentation: tuple[float, float]
    typical_frame_sum: float | None
    test_rmse: tuple[float, float, float]
    coarse_test_rmse: tuple[float, float, float]
    refiner: RefinerCard | None
    outputs: tuple[str, ...] = PARAMETERS
    thickness_range_angstrom: tuple[float, float] | None = None
    metadata: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def predicts_thickness(self) -> bool:
        return "thickness" in self.outputs

    @property
    def lacks(self) -> tuple[str, ...]:
        """What this model file does not provide that current ones do (empty for a current one)."""
        return () if self.predicts_thickness else ("thickness",)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelCard:
        """Validate a model file's metadata; :class:`ModelCardError` names what is missing."""
        ranges_raw = _get(metadata, "parameter_ranges")
        ranges = {}
        for p in PARAMETERS:
            low, high = _floats(
                _get(ranges_raw, p) if isinstance(ranges_raw, dict) else None, f"parameter_ranges.{p}", 2
            )
            ranges[p] = (low, high)
        metrics = metadata.get("metrics") or {}

        def rmse(stage: Any) -> tuple[float, float, float]:
            stage = stage if isinstance(stage, dict) else {}
            values = [float(stage.get(f"rmse_{p}", float("nan"))) for p in PARAMETERS]
            return values[0], values[1], values[2]

        refiner = None
        if "refiner" in metadata:
            ref = _get(metadata, "refiner")
            registration = dict(_get(ref, "registration"))
            n_refined = 3 if float(registration.get("pixels_per_strain", 0.0)) > 0 else 2
            refiner = RefinerCard(
                architecture=Architecture.from_dict(_get(ref, "architecture"), "refiner.architecture"),
                n_members=int(_get(ref, "n_members")),
                registration=registration,
                half_range=_floats(
                    _get(ref, "output_normalisation.half_range"),
                    "refiner.output_normalisation.half_range",
                    n_refined,
                ),
            )
        augmentation = _floats(
            _get(metadata, "count_level").get("augmentation", [1.0, 1.0]), "count_level.augmentation", 2
        )
        typical = metadata.get("typical_frame_sum")
        outputs = tuple(str(o) for o in metadata.get("outputs", PARAMETERS))
        if outputs not in (PARAMETERS, (*PARAMETERS, "thickness")):
            raise ModelCardError(
                f"the model file's 'outputs' must be {list(PARAMETERS)} [+ 'thickness'], got {list(outputs)}"
            )
        thickness_range = None
        if "thickness" in outputs:
            low, high = _floats(_get(metadata, "thickness_range_angstrom"), "thickness_range_angstrom", 2)
            thickness_range = (low, high)
        centre = _floats(
            _get(metadata, "output_normalisation.centre"), "output_normalisation.centre", len(outputs)
        )
        half_range = _floats(
            _get(metadata, "output_normalisation.half_range"), "output_normalisation.half_range", len(outputs)
        )
        try:
            instrument = Instrument.from_dict(_get(metadata, "instrument"))
        except ValueError as exc:
            raise ModelCardError(f"the model file's instrument is not valid: {exc}") from exc
        return cls(
            model_id=str(_get(metadata, "model_id")),
            sha256=str(metadata.get("sha256", "")),
            architecture=Architecture.from_dict(_get(metadata, "architecture"), "architecture"),
            instrument=instrument,
            parameter_ranges=ranges,
            output_centre=centre,
            output_half_range=half_range,
            frame_pixels=int(_get(metadata, "input.frame_pixels")),
            max_counts=float(_get(metadata, "count_level.max_counts")),
            count_augmentation=(augmentation[0], augmentation[1]),
            typical_frame_sum=None if typical is None else float(typical),
            test_rmse=rmse(metrics.get("ensemble")),
            coarse_test_rmse=rmse(metrics.get("coarse_ensemble", metrics.get("ensemble"))),
            refiner=refiner,
            outputs=outputs,
            thickness_range_angstrom=thickness_range,
            metadata=metadata,
        )
