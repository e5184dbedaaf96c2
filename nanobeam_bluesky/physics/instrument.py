"""The instrument: beam, zone plate, film and detector, as one frozen dataclass.

Defaults are the seed experiment of docs/physics.md (SrIrO3 on LSAT, pseudo-cubic 002).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .._schema import PARAMETERS, UNITS
from ..errors import NanobeamError

__all__ = ["HC_KEV_ANGSTROM", "ORIENTATION_FIELDS", "PARAMETERS", "UNITS", "Instrument", "InstrumentError"]

#: h c in keV * Angstrom, as fixed by physics.md (lambda[A] = 12.398 / E[keV]).
HC_KEV_ANGSTROM = 12.398
#: The fields that say how the physical detector is mounted (flips, transpose).
ORIENTATION_FIELDS = ("detector_transpose", "detector_flip_rows", "detector_flip_cols")


class InstrumentError(NanobeamError, ValueError):
    """An instrument description that cannot describe a real measurement."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does: ``7e-5`` and ``1e3`` are floats
    (YAML 1.1 wants ``7.0e-5`` and reads ``7e-5`` as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InstrumentError(f"{name} must be a pair [low, high], got {value!r}") from None
    if not low < high:
        raise InstrumentError(f"{name} must have low < high, got [{low}, {high}]")
    return (low, high)


@dataclass(frozen=True)
class Instrument:
    """Everything the forward model needs about beam, optics, film and detector.

    Lengths carry their unit in the field name; angles are in degrees unless named ``_rad``.
    """

    energy_kev: float = 11.3
    lattice_c_angstrom: float = 4.013
    reflection_l: int = 2
    film_thickness_angstrom: float = 117.0
    zone_plate_diameter_m: float = 149e-6
    central_stop_diameter_m: float = 77e-6
    #: None: derived from ``outermost_zone_width_m`` as f = D dr / lambda.
    focal_length_m: float | None = 21.874e-3
    outermost_zone_width_m: float | None = None
    detector_distance_m: float = 0.85
    #: Physical (unbinned) detector pixel.
    detector_pixel_m: float = 55e-6
    roi_pixels: int = 128
    binning: int = 2
    #: Orientation of the physical detector relative to physics.md's frame, applied to raw ROIs
    #: by ``bin_roi``, ``Predictor.predict``, the live callback, replay and the fits.
    detector_transpose: bool = False
    detector_flip_rows: bool = False
    detector_flip_cols: bool = False
    #: Raw ROI rows, columns and [row, col] pixels that are not observations (module gaps, dead,
    #: hot pixels), in the detector's own orientation, counted from the ROI's first row/column.
    #: A binned pixel with any of them is left out of every fit and check.
    detector_mask_rows: tuple[int, ...] = ()
    detector_mask_cols: tuple[int, ...] = ()
    detector_mask_pixels: tuple[tuple[int, int], ...] = ()
    #: Raw counts at which a pixel saturates or marks an overflow; None: the maximum of an integer
    #: data type (e.g. 65535 for uint16). Such pixels are left out and the frame flagged SATURATED.
    detector_saturation_counts: float | None = None
    #: The detector delivers photon counts (integers); False for scaled or corrected frames (the
    #: Poisson check then cannot vouch for them).
    integer_counts: bool = True
    #: Where the central reflected ray really meets the binned frame, relative to its centre:
    #: [rows, cols] in binned pixels (physics.md's beam-centre offset). It moves the whole pattern
    #: and, in one frame, looks exactly like a tilt plus a strain: calibrate it per set-up. The
    #: physics check and the likelihood step use it; the networks assume 0.
    beam_centre_offset_px: tuple[float, float] = (0.0, 0.0)
    #: Sub-pixels per binned pixel along each axis used by the simulator.
    upsample: int = 8
    strain_range: tuple[float, float] = (-0.005, 0.005)
    omega_range_deg: tuple[float, float] = (-0.05, 0.05)
    chi_range_deg: tuple[float, float] = (-0.1, 0.1)
    grid_points: int = 41
    #: Free-form label (beamline, sample) carried into metadata; ignored by the physics.
    name: str = field(default="default", compare=False)

    def __post_init__(self) -> None:
        for name in ("strain_range", "omega_range_deg", "chi_range_deg"):
            object.__setattr__(self, name, _pair(getattr(self, name), name))
        self._normalise_mask()
        try:
            offset = tuple(float(v) for v in self.beam_centre_offset_px)
        except (TypeError, ValueError):
            offset = ()
        if len(offset) != 2 or not all(math.isfinite(v) and abs(v) < self._frame_side() / 2 for v in offset):
            raise InstrumentError(
                f"beam_centre_offset_px must be [rows, cols] in binned pixels, within the "
                f"frame, got {self.beam_centre_offset_px!r}"
            )
        object.__setattr__(self, "beam_centre_offset_px", offset)
        positive = (
            "energy_kev",
            "lattice_c_angstrom",
            "film_thickness_angstrom",
            "zone_plate_diameter_m",
            "detector_distance_m",
            "detector_pixel_m",
        )
        for name in positive:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                quoted = " (write it without quotes)" if isinstance(value, str) else ""
                raise InstrumentError(f"{name} must be a positive number{quoted}, got {value!r}")
        for name in ("focal_length_m", "outermost_zone_width_m"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise InstrumentError(f"{name} must be a positive number or null, got {value!r}")
        if self.focal_length_m is None and self.outermost_zone_width_m is None:
            raise InstrumentError(
                "focal_length_m is null and outermost_zone_width_m is not given: "
                "set one of them so the focal length is known"
            )
        if not 0 <= self.central_stop_diameter_m < self.zone_plate_diameter_m:
            raise InstrumentError(
                "central_stop_diameter_m must be >= 0 and smaller than zone_plate_diameter_m "
                f"({self.central_stop_diameter_m} vs {self.zone_plate_diameter_m})"
            )
        for name in ("reflection_l", "roi_pixels", "binning", "upsample", "grid_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InstrumentError(f"{name} must be a positive integer, got {value!r}")
        if self.roi_pixels % self.binning:
            raise InstrumentError(
                f"roi_pixels ({self.roi_pixels}) must be a multiple of binning ({self.binning})"
            )
        if self.frame_pixels % 2:
            raise InstrumentError(
                f"roi_pixels / binning must be even so the frame centre lies between pixels, "
                f"got {self.frame_pixels}"
            )
        sin_theta = self.reflection_l * self.wavelength_angstrom / (2 * self.lattice_c_angstrom)
        if sin_theta >= 1:
            raise InstrumentError(
                f"reflection_l={self.reflection_l} cannot diffract: l*lambda/(2c) = {sin_theta:.3f} "
                ">= 1; lower reflection_l or raise energy_kev"
            )

    def _frame_side(self) -> int:
        """The binned frame side, or 0 while the sizes are not yet validated."""
        sizes = (self.roi_pixels, self.binning)
        return self.roi_pixels // self.binning if all(isinstance(v, int) and v > 0 for v in sizes) else 0

    def _normalise_mask(self) -> None:
        roi = self.roi_pixels if isinstance(self.roi_pixels, int) else 0

        def index(value: Any, name: str) -> int:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value != int(value)
                or not 0 <= value < roi
            ):
                raise InstrumentError(f"{name} must hold raw ROI indices 0..{roi - 1}, got {value!r}")
            return int(value)

        for name in ("detector_mask_rows", "detector_mask_cols"):
            values = getattr(self, name) or ()
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                raise InstrumentError(f"{name} must be a list of raw ROI indices, got {values!r}")
            object.__setattr__(self, name, tuple(sorted({index(v, name) for v in values})))
        pixels = []
        for pair in self.detector_mask_pixels or ():
            try:
                row, col = pair
            except (TypeError, ValueError):
                raise InstrumentError(
                    f"detector_mask_pixels must be a list of [row, col] pairs, got {pair!r}"
                ) from None
            pixels.append((index(row, "detector_mask_pixels"), index(col, "detector_mask_pixels")))
        object.__setattr__(self, "detector_mask_pixels", tuple(sorted(set(pixels))))
        limit = self.detector_saturation_counts
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or not math.isfinite(limit)
            or limit <= 0
        ):
            raise InstrumentError(
                f"detector_saturation_counts must be a positive number or null, got {limit!r}"
            )
        for name in ("detector_transpose", "detector_flip_rows", "detector_flip_cols", "integer_counts"):
            if not isinstance(getattr(self, name), bool):
                raise InstrumentError(
                    f"{name} must be true or false (without quotes), got {getattr(self, name)!r}"
                )

    # ---------------------------------------------------------------- derived quantities
    @property
    def wavelength_angstrom(self) -> float:
        return HC_KEV_ANGSTROM / self.energy_kev

    @property
    def k_inv_angstrom(self) -> float:
        """Wavenumber k = 2 pi / lambda, in 1/Angstrom."""
        return 2 * math.pi / self.wavelength_angstrom

    @property
    def bragg_angle_rad(self) -> float:
        return math.asin(self.reflection_l * self.wavelength_angstrom / (2 * self.lattice_c_angstrom))

    @property
    def bragg_angle_deg(self) -> float:
        return math.degrees(self.bragg_angle_rad)

    @property
    def effective_focal_length_m(self) -> float:
        """The focal length, or D dr / lambda when only the outermost zone width is given."""
        if self.focal_length_m is not None:
            return self.focal_length_m
        # __post_init__ refuses an instrument with neither given
        assert self.outermost_zone_width_m is not None
        return self.zone_plate_diameter_m * self.outermost_zone_width_m / (self.wavelength_angstrom * 1e-10)

    @property
    def convergence_half_angle_rad(self) -> float:
        return self.zone_plate_diameter_m / (2 * self.effective_focal_length_m)

    @property
    def frame_pixels(self) -> int:
        """Side of the binned frame the model sees (64 by default)."""
        return self.roi_pixels // self.binning

    @property
    def binned_pixel_m(self) -> float:
        return self.detector_pixel_m * self.binning

    @property
    def tau_inv_angstrom(self) -> float:
        """Resolution parameter tau = 2 pi E delta / (R hc) per binned pixel, in 1/Angstrom."""
        return (
            2 * math.pi * self.energy_kev * self.binned_pixel_m / (self.detector_distance_m * HC_KEV_ANGSTROM)
        )

    @property
    def parameter_ranges(self) -> dict[str, tuple[float, float]]:
        return {"strain": self.strain_range, "omega": self.omega_range_deg, "chi": self.chi_range_deg}

    # ---------------------------------------------------------------- comparison
    def physics_dict(self) -> dict[str, Any]:
        """The fields that change the frames (not ranges, orientation or labels)."""
        keys = (
            "energy_kev",
            "lattice_c_angstrom",
            "reflection_l",
            "film_thickness_angstrom",
            "zone_plate_diameter_m",
            "central_stop_diameter_m",
            "detector_distance_m",
            "detector_pixel_m",
            "roi_pixels",
            "binning",
        )
        out = {key: getattr(self, key) for key in keys}
        out["effective_focal_length_m"] = self.effective_focal_length_m
        return out

    def physics_only(self) -> Instrument:
        """This instrument without what does not shape the expected frames (label, detector
        mounting, masks, saturation, count type); the beam-centre offset stays. The key of
        per-instrument caches."""
        return dataclasses.replace(
            self,
            name="default",
            detector_transpose=False,
            detector_flip_rows=False,
            detector_flip_cols=False,
            detector_mask_rows=(),
            detector_mask_cols=(),
            detector_mask_pixels=(),
            detector_saturation_counts=None,
            integer_counts=True,
        )

    def orientation_dict(self) -> dict[str, bool]:
        """How the physical detector is mounted relative to physics.md's frame."""
        return {key: getattr(self, key) for key in ORIENTATION_FIELDS}

    def differences(
        self, other: Instrument, rtol: float = 1e-6, *, orientation: bool = False
    ) -> dict[str, tuple[Any, Any]]:
        """Physics fields (and with ``orientation``, the detector's mounting) that differ between
        two instruments: {name: (self, other)}."""
        mine, theirs = self.physics_dict(), other.physics_dict()
        out = {
            key: (mine[key], theirs[key])
            for key in mine
            if not math.isclose(mine[key], theirs[key], rel_tol=rtol)
        }
        if orientation:
            out |= {
                key: (value, getattr(other, key))
                for key, value in self.orientation_dict().items()
                if value != getattr(other, key)
            }
        return out

    def describe_differences(
        self, other: Instrument, mine: str, theirs: str, *, orientation: bool = False
    ) -> str:
        """ "" if the physics matches, else e.g. "detector_distance_m: model 0.85 vs data 1.2"."""
        return ", ".join(
            f"{k}: {mine} {a!r} vs {theirs} {b!r}"
            for k, (a, b) in self.differences(other, orientation=orientation).items()
        )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Instrument:
        if not isinstance(data, dict):
            raise InstrumentError(f"an instrument config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InstrumentError(f"unknown instrument key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> Instrument:
        return self.from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Instrument:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Instrument:
        """An instrument from YAML text; numbers as YAML 1.2 reads them (``7e-5`` is a number),
        an empty document refused."""
        data = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no Python objects
        if data is None:
            raise InstrumentError(
                "the instrument config is empty; write the keys that differ from the default "
                "instrument (docs/physics.md lists them), or leave --instrument out"
            )
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> Instrument:
        """Read an instrument from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InstrumentError(f"cannot read instrument config {path}: {exc}") from exc
        try:
            if path.suffix == ".json":
                return cls.from_json(text)
            return cls.from_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise InstrumentError(f"instrument config {path} is not valid {path.suffix}: {exc}") from exc
