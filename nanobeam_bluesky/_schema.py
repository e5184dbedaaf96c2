"""The results schema: the one home of what every result says.

Parameters and their units, the quality flags and their meanings, what each per-frame variable
of a result means (``predict()``, the fits, the derived stream), and the derived stream's
event-model data keys. Everything that writes or describes a result takes it from here.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

__all__ = [
    "CHECK_VARIABLES",
    "ERR_MEANING",
    "FLAG_BITS",
    "FLAG_DTYPE",
    "NO_VALUE",
    "PARAMETERS",
    "RESULT_UNITS",
    "STD_MEANING",
    "UNITS",
    "Flag",
    "derived_data_key",
    "flag_attributes",
    "flag_description",
    "variable_attrs",
]

#: The sample parameters, in the order every array and model output uses.
PARAMETERS = ("strain", "omega", "chi")
#: Their units: strain is dimensionless, the tilts are in degrees.
UNITS = {"strain": "1", "omega": "deg", "chi": "deg"}
#: Units of every per-frame value a result may hold: the parameters and the film thickness
#: (models that predict it).
RESULT_UNITS = {**UNITS, "thickness": "Angstrom"}

#: The flag's dtype everywhere (arrays, datasets, derived event data).
FLAG_DTYPE = np.uint16


class Flag(enum.IntFlag):
    """Per-frame quality bits of the ``flag`` variable. 0: nothing found; the values can be trusted
    within their ``*_err``."""

    OK = 0
    #: Non-finite or negative values on pixels that are not masked: no value.
    INVALID = 1
    #: Far too few counts for a measurement: no value.
    LOW_COUNTS = 2
    #: The model raised on this frame's batch (set by the live callback): no value.
    MODEL_ERROR = 4
    #: The estimate lies outside the parameter box the model was trained on: extrapolated.
    OUT_OF_RANGE = 8
    #: A pixel at or above the detector's saturation or overflow value; those pixels are left out.
    SATURATED = 16
    #: A pixel holds more counts than the instrument can produce at this frame's count level (a hot
    #: or stuck pixel, or one holding most of the frame); those pixels are left out.
    HOT_PIXEL = 32
    #: Counts that are not integers where the instrument says they are (scaled, flat-field
    #: corrected or corrupted data): the Poisson check and ``*_err`` do not apply.
    NON_INTEGER = 64
    #: Less than half of the counts lie on the annulus at the fitted position: no diffraction
    #: ring (closed shutter, flat field, noise, another reflection): no value.
    NO_RING = 128
    #: The frame departs from the forward model at the estimate by more than Poisson noise allows
    #: (``fit_quality`` above its threshold): background structure, unmasked dead pixels, another
    #: material... The values and ``*_err`` assume a frame that the model describes.
    POOR_FIT = 256
    #: The width of the Laue band says the film thickness differs from the instrument's (score
    #: test): strain is biased. Describe the film (``film_thickness_angstrom``) or use a model
    #: trained for it.
    THICKNESS = 512
    #: Taken together, the frames of this call (or live run) disagree with the instrument: their
    #: thickness scores or deviances are shifted on average, though single frames may pass (a film
    #: a few Angstrom off, another energy or material). The instrument description does not fit
    #: this sample; the pooled thickness estimate is in the result's attributes.
    POOLED_MISMATCH = 1024


#: Each bit by name, in value order, OK left out: what iterating Flag gives, with names that are
#: never None (a Flag's ``name`` is None for a combination of bits).
FLAG_BITS: dict[str, Flag] = {name: bit for name, bit in Flag.__members__.items() if bit}

#: Flags whose frames get no value (NaN).
NO_VALUE = Flag.INVALID | Flag.LOW_COUNTS | Flag.MODEL_ERROR | Flag.NO_RING


def flag_description() -> str:
    """One line naming every bit, e.g. for an event-model data key's description."""
    return "quality bits (0: none): " + ", ".join(f"{int(f)}={name}" for name, f in FLAG_BITS.items())


def flag_attributes() -> dict[str, Any]:
    """CF-convention attributes of a ``flag`` variable (flag_masks, flag_meanings)."""
    return {
        "flag_masks": [int(f) for f in FLAG_BITS.values()],
        "flag_meanings": " ".join(name.lower() for name in FLAG_BITS),
        "long_name": "quality bits (0: none found)",
    }


#: What ``*_err`` means, in every result and data key.
ERR_MEANING = (
    "expected error: the standard deviation to expect for this frame (Fisher information "
    "at the estimate, floored at the forward model's accuracy); meaningful where flag is 0"
)
#: What ``*_std`` means.
STD_MEANING = "ensemble std (the networks' spread, not an error bar)"
#: Per-frame outputs of the physics check: {name: (units, long_name)}.
CHECK_VARIABLES: dict[str, tuple[str, str]] = {
    "fit_quality": (
        "1",
        "Poisson deviance z-score against the forward model at the estimate (about "
        "N(0,1) when the physics describes the frame)",
    ),
    "thickness_z": ("1", "score-test z of the film thickness (about N(0,1) at the instrument's thickness)"),
    "count_scale": ("counts", "expected counts of a fully lit pixel at the Laue maximum"),
    "background": ("counts", "background counts per binned pixel"),
}


def variable_attrs(name: str, estimator: str = "estimate") -> dict[str, Any]:
    """``units`` and ``long_name`` of a result variable: a parameter, its ``_std`` or ``_err``, a
    check output or ``flag``; ``estimator`` names what made the parameter's value."""
    if name == "flag":
        return flag_attributes()
    if name in CHECK_VARIABLES:
        units, long_name = CHECK_VARIABLES[name]
        return {"units": units, "long_name": long_name}
    base = name.removesuffix("_std").removesuffix("_err")
    what = {"_std": STD_MEANING, "_err": ERR_MEANING}.get(name[len(base) :], f"({estimator})")
    return {"units": RESULT_UNITS[base], "long_name": f"{base} {what}"}


def derived_data_key(name: str, source: str) -> dict[str, Any]:
    """The event-model data key of a derived-stream field (a parameter, ``_std``, ``_err``,
    ``fit_quality`` or ``flag``)."""
    if name == "flag":
        return {
            "source": source,
            "dtype": "integer",
            "dtype_numpy": np.dtype(FLAG_DTYPE).str,
            "shape": [],
            "units": None,
            "description": flag_description(),
        }
    attrs = variable_attrs(name, "likelihood step from the network")
    return {
        "source": source,
        "dtype": "number",
        "dtype_numpy": "<f8",
        "shape": [],
        "units": attrs["units"],
        "precision": 2 if name in CHECK_VARIABLES else 6,
        "description": attrs["long_name"],
    }
