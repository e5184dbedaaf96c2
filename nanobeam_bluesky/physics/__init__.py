"""The forward model of docs/physics.md (the project's physics and conventions) and what surrounds it."""

from .counts import bin_roi, binned_instrument_mask, orient, roi_origin, to_counts
from .crlb import crlb, fisher_information
from .forward import iter_grid, lab_geometry, simulate, simulate_exact, simulate_roi, simulate_tensor
from .frame_model import FrameModel, annulus_centre_px
from .instrument import HC_KEV_ANGSTROM, ORIENTATION_FIELDS, PARAMETERS, UNITS, Instrument, InstrumentError
from .library import LibraryError, grid_axes, library_instrument, open_library, write_library

__all__ = [
    "HC_KEV_ANGSTROM",
    "ORIENTATION_FIELDS",
    "PARAMETERS",
    "UNITS",
    "FrameModel",
    "Instrument",
    "InstrumentError",
    "LibraryError",
    "annulus_centre_px",
    "bin_roi",
    "binned_instrument_mask",
    "crlb",
    "fisher_information",
    "grid_axes",
    "iter_grid",
    "lab_geometry",
    "library_instrument",
    "open_library",
    "orient",
    "roi_origin",
    "simulate",
    "simulate_exact",
    "simulate_roi",
    "simulate_tensor",
    "to_counts",
    "write_library",
]
