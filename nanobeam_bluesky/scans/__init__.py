"""Scans on disk turned into ε/ω/χ maps (``nanobeam predict``): readers of the files beamlines
write, the chunked prediction that overlaps reading with the model, and the orientation check.

- :func:`open_scan`: an HDF5 file (ours, areaDetector or NeXus) or a directory of TIFF frames as
  a :class:`ScanSource` (:func:`tiff_frame_files`: a directory's TIFFs in acquisition order);
  :func:`read_positions`: positions from a CSV or an APS sscan MDA file.
- :func:`predict_scan`: the maps, with errors and flags, on the scan grid; :func:`write_maps`
  (NetCDF-4) and :func:`save_scan_maps` (PNG).
- :func:`calibrate`: what the model takes as given (film thickness, hot and dead pixels, count
  scale, background) estimated from a scan's own frames (``nanobeam calibrate``).
- :func:`adapt_to_scan`: the model fine-tuned to the scan's instrument on its own unlabelled
  frames (``nanobeam adapt``).
- :func:`check_orientation`: which of the 8 detector orientations the physics fits
  (``nanobeam check-orientation``), and :func:`save_orientation_figure`.
"""

from ._adapt import adapt_to_scan
from ._calibrate import MIN_CALIBRATION_FRAMES, Calibration, calibrate, find_bad_pixels
from ._maps import ScanMaps, predict_scan, save_scan_maps, write_maps
from ._orientation import (
    ORIENTATIONS,
    Orientation,
    OrientationReport,
    check_orientation,
    orientation_named,
    save_orientation_figure,
)
from ._sources import (
    HDF5_FRAME_DATASETS,
    ScanPositionsTable,
    ScanSource,
    grid_of_positions,
    open_hdf5_scan,
    open_scan,
    open_tiff_directory,
    read_positions,
    read_spread,
    tiff_frame_files,
)

__all__ = [
    "HDF5_FRAME_DATASETS",
    "MIN_CALIBRATION_FRAMES",
    "ORIENTATIONS",
    "Calibration",
    "Orientation",
    "OrientationReport",
    "ScanMaps",
    "ScanPositionsTable",
    "ScanSource",
    "adapt_to_scan",
    "calibrate",
    "check_orientation",
    "find_bad_pixels",
    "grid_of_positions",
    "open_hdf5_scan",
    "open_scan",
    "open_tiff_directory",
    "orientation_named",
    "predict_scan",
    "read_positions",
    "read_spread",
    "save_orientation_figure",
    "save_scan_maps",
    "tiff_frame_files",
    "write_maps",
]
