"""Lengths as beamline files name them, to micrometres (the unit of every position here)."""

from __future__ import annotations

__all__ = ["micrometres_per"]

#: Factors to micrometres, by lower-cased unit name.
_MICROMETRES_PER = {
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), 1e6),
    **dict.fromkeys(("mm", "millimeter", "millimeters", "millimetre", "millimetres"), 1000.0),
    **dict.fromkeys(
        ("um", "µm", "μm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"), 1.0
    ),
    **dict.fromkeys(("nm", "nanometer", "nanometers", "nanometre", "nanometres"), 1e-3),
}


def micrometres_per(unit: str) -> float | None:
    """Micrometres in one ``unit`` (e.g. 1000.0 for "mm"); None when it is not a length."""
    return _MICROMETRES_PER.get(unit.strip().lower())
