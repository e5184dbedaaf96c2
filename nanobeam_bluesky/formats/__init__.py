"""Scan files from other facilities' data-acquisition software, read for their scan positions.

- APS sscan **MDA** files (EPICS ``saveData``; versions 1.3 and 1.4, 1-D and 2-D scans):
  :func:`read_mda` and :func:`write_mda` for the whole file, :func:`mda_positions` for the
  positions (µm) and shape of the acquired points.
"""

from __future__ import annotations

from ._mda import (
    DBR_CTRL_CHAR,
    DBR_CTRL_DOUBLE,
    DBR_CTRL_FLOAT,
    DBR_CTRL_LONG,
    DBR_CTRL_SHORT,
    DBR_STRING,
    MDA_VERSIONS,
    MdaDetector,
    MdaExtraPvInfo,
    MdaFile,
    MdaPositioner,
    MdaScan,
    MdaTrigger,
    ScanPositions,
    mda_positions,
    read_mda,
    write_mda,
)
from ._units import micrometres_per

__all__ = [
    "DBR_CTRL_CHAR",
    "DBR_CTRL_DOUBLE",
    "DBR_CTRL_FLOAT",
    "DBR_CTRL_LONG",
    "DBR_CTRL_SHORT",
    "DBR_STRING",
    "MDA_VERSIONS",
    "MdaDetector",
    "MdaExtraPvInfo",
    "MdaFile",
    "MdaPositioner",
    "MdaScan",
    "MdaTrigger",
    "ScanPositions",
    "mda_positions",
    "micrometres_per",
    "read_mda",
    "write_mda",
]
