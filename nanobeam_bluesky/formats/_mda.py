"""APS sscan MDA files (EPICS ``saveData``): a reader, a writer, and the scan positions they hold.

Format followed: the sscan module's own description, "MDA File Format" (epics-modules/sscan,
``docs/MDAFormat.md``; earlier ``documentation/saveData_fileFormat.txt``), with the XDR encoding
of RFC 1014 / RFC 4506; no other project's code was copied (saveData's ``writeXDR.c`` was only
consulted for how an XDR char is stored: as a 4-byte int). In short (every number is
big-endian; every XDR "short", "int", "long" and "char" takes 4 bytes; floats 4, doubles 8)::

    FILE HEADER   float version (1.3 or 1.4), int scan number, int rank, int dims[rank]
                  (requested points, outermost dimension first), int isRegular,
                  int byte offset of the extra PVs (0: none)
    SCAN          int rank, int NPTS (requested), int CPT (acquired);
                  if rank > 1: int offsets[NPTS] of the inner scans (0: not written);
                  counted strings: scan name, time stamp; int #positioners, #detectors, #triggers;
                  per positioner: int number, 7 counted strings (name, desc, step mode, unit,
                  readback name, readback desc, readback unit); per detector: int number,
                  3 counted strings (name, desc, unit); per trigger: int number, counted string
                  name, float command; then per positioner NPTS doubles (readbacks) and per
                  detector NPTS floats. Only the first CPT values of each array are data.
    [SCAN] ...    the inner scans, one per outer point, where the offsets table points
    EXTRA PVs     int count; per PV: counted strings name, desc; int DBR type; unless
                  DBR_STRING: int count, counted string unit; then the value (a counted string
                  for DBR_STRING, else ``count`` XDR items of the type: char, short and long as
                  4-byte ints, float, double)

A counted string is an int length and, when it is not 0, an XDR string (the length again, the
bytes, zero padding to a multiple of 4). Versions 1.3 and 1.4 lay the bytes out the same way
(the older text spells some fields "short", which XDR encodes in 4 bytes as well); only the
version number differs. Extra PVs of DBR_CTRL_CHAR are taken as ``count`` 4-byte XDR chars
(``xdr_vector(count, xdr_char)`` of the description) and read as a NUL-terminated string.

Positions: :func:`mda_positions` turns a 1-D or 2-D scan into flat positions in acquisition order
(micrometres when the positioner's unit is a length: mm, µm or nm) and the scan shape. In a 2-D
file the outer scan steps the rows (y by default), and each outer point holds an inner 1-D scan
along the row (x by default).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import InputError
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
    "read_mda",
    "write_mda",
]

logger = logging.getLogger(__name__)

#: The file-format versions read and written (the version float of the file header).
MDA_VERSIONS = (1.3, 1.4)

#: EPICS channel-access request types that saveData uses for the extra PVs (db_access.h).
DBR_STRING = 0
DBR_CTRL_SHORT = 29
DBR_CTRL_FLOAT = 30
DBR_CTRL_CHAR = 32
DBR_CTRL_LONG = 33
DBR_CTRL_DOUBLE = 34
_DBR_NAMES = {
    DBR_STRING: "DBR_STRING",
    DBR_CTRL_SHORT: "DBR_CTRL_SHORT",
    DBR_CTRL_FLOAT: "DBR_CTRL_FLOAT",
    DBR_CTRL_CHAR: "DBR_CTRL_CHAR",
    DBR_CTRL_LONG: "DBR_CTRL_LONG",
    DBR_CTRL_DOUBLE: "DBR_CTRL_DOUBLE",
}

# Sanity limits, far above anything saveData writes (4 positioners, 70 detectors, 4 triggers), that
# tell a corrupt count from a real one before it allocates memory.
_MAX_ITEMS = 10_000
_MAX_STRING = 1 << 20


# --------------------------------------------------------------------------------------------------
# The file's contents


@dataclass
class MdaPositioner:
    """One positioner of a scan (sscan fields PnPV, RnPV and their descriptions and units).

    ``values`` are the readbacks saved for the acquired points (float64, ``current_point`` of
    them), in the positioner's own unit (``readback_units``, else ``units``).
    """

    number: int
    name: str
    description: str
    units: str
    readback_name: str
    readback_description: str
    readback_units: str
    values: npt.NDArray[np.float64]
    step_mode: str = "LINEAR"

    @property
    def unit(self) -> str:
        """The unit of ``values``: the readback's unit, else the positioner's."""
        return self.readback_units or self.units


@dataclass
class MdaDetector:
    """One detector of a scan (sscan DnnPV); ``values`` (float32, ``current_point`` of them) in ``units``."""

    number: int
    name: str
    description: str
    units: str
    values: npt.NDArray[np.float32]


@dataclass
class MdaTrigger:
    """One detector trigger of a scan (sscan TnPV and the value TnCD it writes)."""

    number: int
    name: str
    command: float


@dataclass
class MdaScan:
    """One sscan record's scan: a 1-D scan, or the outer scan of a 2-D file with its inner scans.

    ``requested_points`` is NPTS; ``current_point`` (CPT) the points acquired, smaller when the scan
    was aborted. ``inner`` holds one 1-D scan per outer point that was started (rank-2 scans only),
    in order; an aborted 2-D scan may hold one more inner scan than ``current_point``: the row that
    was running, with the points it acquired.
    """

    rank: int
    requested_points: int
    current_point: int
    positioners: list[MdaPositioner] = field(default_factory=list)
    detectors: list[MdaDetector] = field(default_factory=list)
    inner: list[MdaScan] = field(default_factory=list)
    #: The sscan record that ran the scan (e.g. ``26idbSOFT:scan1``).
    name: str = ""
    #: When the scan started, as saveData wrote it (free text, e.g. ``MAY 04, 2024 10:21:07.123``).
    time_stamp: str = ""
    triggers: list[MdaTrigger] = field(default_factory=list)


@dataclass(frozen=True)
class MdaExtraPvInfo:
    """How an extra PV was stored: its description, unit, EPICS DBR type and element count."""

    description: str = ""
    units: str = ""
    dbr_type: int = DBR_CTRL_DOUBLE
    count: int = 1


@dataclass
class MdaFile:
    """An MDA file: the header, the outermost scan, and the extra PVs saved with it.

    ``dimensions`` are the requested points per dimension, outermost first (a 2-D scan:
    ``(rows, columns)``). ``extra_pvs`` maps each PV name to its value: ``str`` for strings and
    char arrays, a Python ``int``/``float`` for one element, a NumPy array for more;
    ``extra_pv_info`` says how each was stored (description, unit, DBR type).
    """

    version: float
    scan_number: int
    rank: int
    dimensions: tuple[int, ...]
    scan: MdaScan
    extra_pvs: dict[str, Any] = field(default_factory=dict)
    extra_pv_info: dict[str, MdaExtraPvInfo] = field(default_factory=dict)
    is_regular: bool = True
    #: The file it was read from ("" when built in memory).
    source: str = ""


# --------------------------------------------------------------------------------------------------
# Reading


class _ReadError(Exception):
    """A read that failed; ``context`` says, once known, which part of the file was being read."""

    def __init__(self, message: str = "", context: str = "") -> None:
        super().__init__(message)
        self.context = context


class _Truncated(_ReadError):
    pass


class _Corrupt(_ReadError):
    pass


class _Buffer:
    """Big-endian XDR items from the bytes of a file, with the position of every read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise _Truncated
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def i4(self) -> int:
        value: int = struct.unpack(">i", self._take(4))[0]
        return value

    def count(self, what: str, limit: int = _MAX_ITEMS) -> int:
        at = self.pos
        n = self.i4()
        if not 0 <= n <= limit:
            raise _Corrupt(f"{what} of {n} at byte {at}")
        return n

    def f4(self) -> float:
        value: float = struct.unpack(">f", self._take(4))[0]
        return value

    def i4s(self, n: int) -> npt.NDArray[np.int32]:
        return np.frombuffer(self._take(4 * n), dtype=">i4").astype(np.int32)

    def f4s(self, n: int) -> npt.NDArray[np.float32]:
        return np.frombuffer(self._take(4 * n), dtype=">f4").astype(np.float32)

    def f8s(self, n: int) -> npt.NDArray[np.float64]:
        return np.frombuffer(self._take(8 * n), dtype=">f8").astype(np.float64)

    def text(self) -> str:
        """A counted string: an int length and, when not 0, an XDR string (length, bytes, padding)."""
        at = self.pos
        n = self.i4()
        if n == 0:
            return ""
        m = self.i4()
        if not (0 < n <= _MAX_STRING and 0 <= m <= n):
            raise _Corrupt(f"a string length of {n}/{m} at byte {at}")
        raw = self._take(m + (-m % 4))[:m]
        return _decode(raw)


def _decode(raw: bytes) -> str:
    raw = raw.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _where(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


def _not_mda(path: str | os.PathLike[str], head: bytes) -> InputError | None:
    """An error naming what the file is, when its first bytes say it is not an MDA file at all."""
    kinds = (
        (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
        (b"PK\x03\x04", "a zip archive"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"II*\0", "a TIFF image"),
        (b"MM\0*", "a TIFF image"),
        (b"CDF\x01", "a netCDF file"),
        (b"\x93NUMPY", "a NumPy file"),
    )
    kind = next((name for magic, name in kinds if head.startswith(magic)), None)
    if kind is None and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:64]):
        kind = "a text file"
    if kind is None:
        return None
    return InputError(
        f"{_where(path)}: not an MDA file (it is {kind}); give an MDA file that EPICS saveData wrote (*.mda)"
    )


def read_mda(path: str | os.PathLike[str]) -> MdaFile:
    """Read an MDA file (versions 1.3 and 1.4; 1-D and 2-D scans) with all its arrays and extra PVs.

    Raises:
        InputError: the file is not an MDA file, is of another version, holds a scan of rank 3 or
            more, or is truncated or corrupt (one line naming the file, the byte, what was being
            read and what to do).
        OSError: the file cannot be read at all (missing, a directory, no permission).
    """
    data = Path(path).read_bytes()
    buf = _Buffer(data)
    where = _where(path)
    context = "the file header"
    if len(data) < 4:
        not_mda = _not_mda(path, data)
        if not_mda is not None:
            raise not_mda
        raise InputError(
            f"{where}: not an MDA file ({len(data)} bytes, too short for the MDA header); give "
            "an MDA file that EPICS saveData wrote (*.mda), copied whole"
        )
    try:
        version = buf.f4()
        if not any(abs(version - v) < 0.005 for v in MDA_VERSIONS):
            raise _bad_version(path, data, version)
        scan_number = buf.i4()
        rank = buf.i4()
        if not 1 <= rank <= 32:
            raise _Corrupt(f"a rank of {rank} at byte 8")
        if rank > 2:
            raise InputError(
                f"{where}: a {rank}-D scan; only 1-D and 2-D MDA scans are supported: "
                "split it into 2-D scans (e.g. with the sscan module's mda.py), or use one "
                "of its 2-D sub-scans"
            )
        dims = tuple(int(d) for d in buf.i4s(rank))
        is_regular = buf.i4() != 0
        extra_offset = buf.i4()
        context = "the outer scan" if rank > 1 else "the scan"
        scan = _read_scan(buf, rank)
        extras: dict[str, Any] = {}
        info: dict[str, MdaExtraPvInfo] = {}
        if extra_offset:
            context = "the extra PVs"
            if extra_offset > len(data):
                raise _Truncated
            if extra_offset < 0:
                raise _Corrupt(f"an extra-PV offset of {extra_offset} in the file header")
            buf.pos = extra_offset
            _read_extra_pvs(buf, extras, info, where)
    except _Truncated as exc:
        raise InputError(
            f"{where}: truncated at byte {len(data)} while reading {exc.context or context} "
            "(the MDA file is incomplete); copy it again, or wait until saveData has finished "
            "writing it"
        ) from None
    except _Corrupt as exc:
        raise InputError(
            f"{where}: corrupt MDA file: {exc} while reading {exc.context or context}; copy "
            "the file again from the beamline (this copy is damaged)"
        ) from None
    return MdaFile(
        version=round(version, 2),
        scan_number=scan_number,
        rank=rank,
        dimensions=dims,
        scan=scan,
        extra_pvs=extras,
        extra_pv_info=info,
        is_regular=is_regular,
        source=where,
    )


def _bad_version(path: str | os.PathLike[str], data: bytes, version: float) -> InputError:
    kind = _not_mda(path, data[:64])
    if kind is not None:
        return kind
    if math.isfinite(version) and 0.5 <= version < 10 and abs(version * 10 - round(version * 10)) < 0.05:
        return InputError(
            f"{_where(path)}: MDA file version {version:.1f} is not supported (only "
            f"{' and '.join(map(str, MDA_VERSIONS))} are); convert it with a current "
            "saveData/mda tool, or export the scan positions to a text file"
        )
    return InputError(
        f"{_where(path)}: not an MDA file (its first 4 bytes are not an MDA version number); "
        "give an MDA file that EPICS saveData wrote (*.mda)"
    )


def _read_scan(buf: _Buffer, expected_rank: int) -> MdaScan:
    """One scan at the buffer's position, and (rank 2) the inner scans its offset table points to."""
    start = buf.pos
    rank = buf.i4()
    if rank != expected_rank:
        raise _Corrupt(f"a scan rank of {rank} (expected {expected_rank}) at byte {start}")
    npts = buf.count("a number of points", limit=100_000_000)
    at = buf.pos
    cpt = buf.i4()
    if not 0 <= cpt <= npts:
        raise _Corrupt(f"a current point of {cpt} (of {npts} requested) at byte {at}")
    offsets = buf.i4s(npts) if rank > 1 else np.zeros(0, dtype=np.int32)
    name = buf.text()
    time_stamp = buf.text()
    n_pos = buf.count("a number of positioners")
    n_det = buf.count("a number of detectors")
    n_trg = buf.count("a number of triggers")
    heads = []
    for _ in range(n_pos):
        number = buf.i4()
        heads.append((number, [buf.text() for _ in range(7)]))
    det_heads = []
    for _ in range(n_det):
        number = buf.i4()
        det_heads.append((number, [buf.text() for _ in range(3)]))
    triggers = []
    for _ in range(n_trg):
        number = buf.i4()
        trig_name = buf.text()
        triggers.append(MdaTrigger(number, trig_name, buf.f4()))
    positioners = []
    for number, (p_name, p_desc, p_mode, p_unit, r_name, r_desc, r_unit) in heads:
        values = buf.f8s(npts)[:cpt]
        positioners.append(
            MdaPositioner(number, p_name, p_desc, p_unit, r_name, r_desc, r_unit, values, step_mode=p_mode)
        )
    detectors = []
    for number, (d_name, d_desc, d_unit) in det_heads:
        detectors.append(MdaDetector(number, d_name, d_desc, d_unit, buf.f4s(npts)[:cpt]))
    scan = MdaScan(
        rank=rank,
        requested_points=npts,
        current_point=cpt,
        positioners=positioners,
        detectors=detectors,
        name=name,
        time_stamp=time_stamp,
        triggers=triggers,
    )
    # Rows before CPT finished; row CPT (when the scan stopped early) may have been running, with an
    # inner scan holding the points it acquired. Offsets past that were never written: saveData
    # leaves them 0, older writers left whatever was there, so they are not followed.
    for i, offset in enumerate(int(o) for o in offsets[: min(cpt + 1, npts)]):
        label = f"the inner scan of row {i + 1} (of {npts})"
        if i == cpt and not _plausible_scan(buf.data, offset, rank - 1):
            break
        if offset == 0:
            if i < cpt:
                raise _Corrupt(f"no inner scan (offset 0) for row {i + 1}, which the outer scan recorded")
            break
        if offset >= len(buf.data):
            raise _Truncated(context=label)
        if offset < 0:
            raise _Corrupt(f"an inner-scan offset of {offset} for row {i + 1}")
        buf.pos = offset
        try:
            scan.inner.append(_read_scan(buf, rank - 1))
        except _ReadError as exc:
            exc.context = exc.context or label
            raise
    return scan


def _plausible_scan(data: bytes, offset: int, rank: int) -> bool:
    """Whether ``offset`` points at the start of a scan of ``rank`` (its rank, NPTS >= CPT >= 0)."""
    if not 0 < offset <= len(data) - 12:
        return False
    head_rank, npts, cpt = struct.unpack(">iii", data[offset : offset + 12])
    return bool(head_rank == rank and 0 <= cpt <= npts)


def _read_extra_pvs(
    buf: _Buffer, extras: dict[str, Any], info: dict[str, MdaExtraPvInfo], where: str
) -> None:
    n = buf.count("a number of extra PVs")
    for i in range(n):
        name = buf.text()
        desc = buf.text()
        at = buf.pos
        dbr = buf.i4()
        if dbr == DBR_STRING:
            extras[name] = buf.text()
            info[name] = MdaExtraPvInfo(desc, "", DBR_STRING, 1)
            continue
        if dbr not in _DBR_NAMES:
            # Not in the format description: its length is unknown, so the PVs after it cannot be
            # found. The scan itself is whole; keep what was read.
            logger.warning(
                "%s: extra PV %s has DBR type %d (at byte %d), which the MDA format does not "
                "describe; it and the %d extra PVs after it are skipped",
                where,
                name,
                dbr,
                at,
                n - i - 1,
            )
            return
        count = buf.count(f"an element count for extra PV {name!r}", limit=100_000_000)
        unit = buf.text()
        value: Any
        if dbr == DBR_CTRL_CHAR:
            codes = buf.i4s(count)
            value = _decode((codes & 0xFF).astype(np.uint8).tobytes())
        elif dbr in (DBR_CTRL_SHORT, DBR_CTRL_LONG):
            ints = buf.i4s(count)
            value = int(ints[0]) if count == 1 else ints
        elif dbr == DBR_CTRL_FLOAT:
            floats = buf.f4s(count)
            value = float(floats[0]) if count == 1 else floats
        else:
            doubles = buf.f8s(count)
            value = float(doubles[0]) if count == 1 else doubles
        extras[name] = value
        info[name] = MdaExtraPvInfo(desc, unit, dbr, count)


# --------------------------------------------------------------------------------------------------
# Writing


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def i4(self, value: int) -> None:
        self.out += struct.pack(">i", value)

    def f4(self, value: float) -> None:
        self.out += struct.pack(">f", value)

    def text(self, text: str) -> None:
        raw = text.encode("utf-8")
        self.i4(len(raw))
        if raw:
            self.i4(len(raw))
            self.out += raw + b"\0" * (-len(raw) % 4)

    def patch(self, at: int, value: int) -> None:
        self.out[at : at + 4] = struct.pack(">i", value)


def _padded(values: Any, npts: int, dtype: str, what: str) -> bytes:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size > npts:
        raise InputError(
            f"{what} has {array.size} values, more than the scan's {npts} requested points; "
            "give at most requested_points values"
        )
    full = np.zeros(npts, dtype=dtype)
    full[: array.size] = array
    return full.tobytes()


def _write_scan(w: _Writer, scan: MdaScan, label: str) -> None:
    npts, cpt = scan.requested_points, scan.current_point
    if not 0 <= cpt <= npts:
        raise InputError(f"{label}: current_point {cpt} must be between 0 and requested_points {npts}")
    if scan.rank > 1 and not cpt <= len(scan.inner) <= min(cpt + 1, npts):
        raise InputError(
            f"{label}: {len(scan.inner)} inner scans for {cpt} acquired of {npts} requested "
            "points; give one per acquired point, and at most one more (the row running when "
            "the scan stopped)"
        )
    if scan.rank == 1 and scan.inner:
        raise InputError(f"{label}: a 1-D scan cannot hold inner scans; give it rank 2")
    w.i4(scan.rank)
    w.i4(npts)
    w.i4(cpt)
    table = len(w.out)
    if scan.rank > 1:
        w.out += bytes(4 * npts)
    w.text(scan.name)
    w.text(scan.time_stamp)
    w.i4(len(scan.positioners))
    w.i4(len(scan.detectors))
    w.i4(len(scan.triggers))
    for p in scan.positioners:
        w.i4(p.number)
        for text in (
            p.name,
            p.description,
            p.step_mode,
            p.units,
            p.readback_name,
            p.readback_description,
            p.readback_units,
        ):
            w.text(text)
    for d in scan.detectors:
        w.i4(d.number)
        for text in (d.name, d.description, d.units):
            w.text(text)
    for t in scan.triggers:
        w.i4(t.number)
        w.text(t.name)
        w.f4(t.command)
    for p in scan.positioners:
        w.out += _padded(p.values, npts, ">f8", f"{label}: positioner {p.name!r}")
    for d in scan.detectors:
        w.out += _padded(d.values, npts, ">f4", f"{label}: detector {d.name!r}")
    for i, inner in enumerate(scan.inner):
        if inner.rank != scan.rank - 1:
            raise InputError(f"{label}: inner scan {i + 1} has rank {inner.rank}, expected {scan.rank - 1}")
        w.patch(table + 4 * i, len(w.out))
        _write_scan(w, inner, f"{label}, inner scan {i + 1}")


def _infer_dbr(value: Any) -> int:
    if isinstance(value, str):
        return DBR_STRING
    array = np.asarray(value)
    if array.dtype.kind in "biu":
        return DBR_CTRL_LONG
    if array.dtype == np.float32:
        return DBR_CTRL_FLOAT
    return DBR_CTRL_DOUBLE


def _write_extra_pvs(w: _Writer, mda: MdaFile, label: str) -> None:
    w.i4(len(mda.extra_pvs))
    for name, value in mda.extra_pvs.items():
        stored = mda.extra_pv_info.get(name)
        dbr = stored.dbr_type if stored is not None else _infer_dbr(value)
        if dbr not in _DBR_NAMES:
            raise InputError(
                f"{label}: extra PV {name!r} has DBR type {dbr}; use one of "
                f"{', '.join(f'{v} ({k})' for v, k in _DBR_NAMES.items())}"
            )
        w.text(name)
        w.text(stored.description if stored is not None else "")
        w.i4(dbr)
        if dbr == DBR_STRING:
            w.text(str(value))
            continue
        unit = stored.units if stored is not None else ""
        if dbr == DBR_CTRL_CHAR:
            raw = str(value).encode("utf-8") + b"\0"
            w.i4(len(raw))
            w.text(unit)
            w.out += np.frombuffer(raw, dtype=np.uint8).astype(">i4").tobytes()
            continue
        array = np.asarray(value).reshape(-1)
        w.i4(array.size)
        w.text(unit)
        dtype = {DBR_CTRL_SHORT: ">i4", DBR_CTRL_LONG: ">i4", DBR_CTRL_FLOAT: ">f4"}.get(dbr, ">f8")
        w.out += array.astype(dtype).tobytes()


def write_mda(path: str | os.PathLike[str], mda: MdaFile, *, version: float | None = None) -> Path:
    """Write ``mda`` as an MDA file (version ``version``, else ``mda.version``: 1.3 or 1.4).

    Any rank is written (nested inner scans, with the table of their byte offsets in each outer
    scan, and the pointer to the extra PVs in the file header), so files that :func:`read_mda`
    refuses can be made too. Positioner and detector arrays shorter than ``requested_points`` are
    padded with zeros, as saveData pads an aborted scan. Extra PVs are written with the DBR type of
    ``mda.extra_pv_info``, else one chosen from the value (``str``: DBR_STRING, integers:
    DBR_CTRL_LONG, float32: DBR_CTRL_FLOAT, other numbers: DBR_CTRL_DOUBLE).

    Returns the path written. Raises InputError for an unsupported version or inconsistent contents.
    """
    target = Path(path)
    label = os.fspath(path)
    version = mda.version if version is None else version
    if not any(abs(version - v) < 0.005 for v in MDA_VERSIONS):
        raise InputError(f"{label}: MDA version {version} cannot be written; use 1.3 or 1.4")
    if mda.rank != mda.scan.rank or len(mda.dimensions) != mda.rank:
        raise InputError(
            f"{label}: rank {mda.rank}, scan rank {mda.scan.rank} and dimensions "
            f"{tuple(mda.dimensions)} disagree; give the scan's rank and one size per dimension"
        )
    w = _Writer()
    w.f4(version)
    w.i4(mda.scan_number)
    w.i4(mda.rank)
    for d in mda.dimensions:
        w.i4(int(d))
    w.i4(1 if mda.is_regular else 0)
    extra_pointer = len(w.out)
    w.i4(0)
    _write_scan(w, mda.scan, label)
    if mda.extra_pvs:
        w.patch(extra_pointer, len(w.out))
        _write_extra_pvs(w, mda, label)
    target.write_bytes(bytes(w.out))
    return target


# --------------------------------------------------------------------------------------------------
# Scan positions


@dataclass(frozen=True)
class ScanPositions:
    """Where each acquired point of a scan was, in acquisition order, and the scan's shape.

    ``x_um``/``y_um`` (float64, one per acquired point) are in micrometres when the positioner's
    unit is a length the reader knows (mm, µm/um/micron, nm); otherwise they keep the file's unit,
    and ``units`` says which. ``shape`` is ``(rows, columns)`` for a 2-D scan (the rows that hold
    data; the last may be partial) or ``(points,)`` for a 1-D scan; ``row``/``col`` place each point
    in it. A 1-D scan has no y unless one is named: ``y_um`` is then zeros and ``names[1]`` None.
    """

    x_um: npt.NDArray[np.float64]
    y_um: npt.NDArray[np.float64]
    shape: tuple[int, ...]
    #: The row (outer index) and column (inner index; the point for 1-D) of each point.
    row: npt.NDArray[np.int64]
    col: npt.NDArray[np.int64]
    #: The positioner (PV) names used for x and y.
    names: tuple[str, str | None]
    #: The unit of ``x_um`` and ``y_um``: "µm" when converted, else the file's unit ("" for no y).
    units: tuple[str, str]
    #: The units as the file states them.
    file_units: tuple[str, str]
    #: The requested points per dimension (the scan as planned).
    requested_shape: tuple[int, ...]
    scan_number: int
    #: Rows whose outer-positioner value was not recorded (the row running when the scan was aborted),
    #: extrapolated one step on from the rows before it.
    estimated_rows: tuple[int, ...] = ()

    @property
    def n_points(self) -> int:
        """The number of points with positions."""
        return int(self.x_um.size)

    @property
    def complete(self) -> bool:
        """True when every requested point was acquired."""
        return self.n_points == math.prod(self.requested_shape)


def _pv_stem(name: str) -> str:
    stem, dot, fieldname = name.rpartition(".")
    return stem if dot and fieldname.isupper() else name


def _find(scans: list[tuple[str, MdaScan]], wanted: str) -> tuple[int, MdaPositioner] | None:
    """(dimension, positioner) whose name, readback name, PV stem or description is ``wanted``."""
    for fold in (False, True):
        key = wanted.casefold() if fold else wanted
        for dim, (_, scan) in enumerate(scans):
            for p in scan.positioners:
                labels = {p.name, p.readback_name, _pv_stem(p.name), _pv_stem(p.readback_name), p.description}
                labels.discard("")
                if key in ({s.casefold() for s in labels} if fold else labels):
                    return dim, p
    return None


def _pick(
    mda: MdaFile, scans: list[tuple[str, MdaScan]], wanted: str | None, dim: int, axis: str
) -> tuple[int, MdaPositioner]:
    where = mda.source or "the MDA file"
    if wanted is None:
        label, scan = scans[dim]
        if not scan.positioners:
            raise InputError(
                f"{where}: {label} (sscan {scan.name or '?'}) has no positioner, so it gives no "
                f"{axis} positions; name one with {axis}= or give a scan that moves a stage"
            )
        return dim, scan.positioners[0]
    found = _find(scans, wanted)
    if found is None:
        available = "; ".join(
            f"{label}: {', '.join(p.name or p.description for p in scan.positioners) or 'none'}"
            for label, scan in scans
        )
        raise InputError(
            f"{where}: no positioner named {wanted!r} for {axis} (positioners: {available}); "
            f"name one of those with {axis}="
        )
    return found


def _acquired(p: MdaPositioner, n: int, where: str, label: str) -> npt.NDArray[np.float64]:
    """The first ``n`` values of ``p`` (float64); InputError when it holds fewer."""
    values = np.asarray(p.values, dtype=np.float64).reshape(-1)
    if values.size < n:
        raise InputError(
            f"{where}: positioner {p.name!r} of {label} has {values.size} values for {n} "
            "acquired points; the file is inconsistent: name another positioner with x=/y="
        )
    return values[:n]


def _outer_values(values: npt.NDArray[np.float64], n_rows: int) -> npt.NDArray[np.float64]:
    """One value per row: the recorded ones, then (rows past CPT) extrapolated one step at a time."""
    missing = n_rows - values.size
    if missing <= 0:
        return values[:n_rows]
    step = values[-1] - values[-2]
    return np.concatenate([values, values[-1] + step * np.arange(1, missing + 1)])


def mda_positions(mda: MdaFile, *, x: str | None = None, y: str | None = None) -> ScanPositions:
    """The positions of the acquired points of a 1-D or 2-D MDA scan, in micrometres, and its shape.

    By default x is the first positioner of the inner scan (of the scan, for 1-D) and y the first
    of the outer scan (none for 1-D). ``x=``/``y=`` name another positioner of either dimension, by
    PV name (with or without the field, e.g. ``26idcnpi:m17`` for ``26idcnpi:m17.VAL``), readback
    PV name or description. Values in mm or nm are converted to µm; µm/um/microns stay; any other
    unit is kept as it is (``units`` says so).

    A 2-D scan that was aborted keeps the rows that hold data; the last row keeps the points it
    acquired. saveData records an outer point only when its row has finished, so the outer
    positioner of that row is extrapolated one step on from the rows before (listed in
    ``estimated_rows``); when fewer than two rows finished, the step is unknown and the running
    row is left out (with a log warning).

    Raises InputError when a positioner is missing or no point was acquired.
    """
    where = mda.source or "the MDA file"
    if mda.rank == 1:
        scans = [("the scan", mda.scan)]
        xd, xp = _pick(mda, scans, x, 0, "x")
        yp = _pick(mda, scans, y, 0, "y")[1] if y is not None else None
        n = mda.scan.current_point
        if n == 0:
            raise InputError(f"{where}: the scan acquired no points; give a scan that ran")
        x_raw = _acquired(xp, n, where, "the scan")
        y_raw = _acquired(yp, n, where, "the scan") if yp is not None else np.zeros(n)
        shape: tuple[int, ...] = (n,)
        rows = np.zeros(n, dtype=np.int64)
        cols = np.arange(n, dtype=np.int64)
        estimated: tuple[int, ...] = ()
    elif mda.rank == 2:
        outer = mda.scan
        # The rows in order, up to the first without a point (started, nothing acquired yet).
        n_rows = next((i for i, s in enumerate(outer.inner) if s.current_point == 0), len(outer.inner))
        if n_rows == 0:
            raise InputError(f"{where}: the 2-D scan acquired no points; give a scan that ran")
        scans = [("the outer scan", outer), ("the inner scan", outer.inner[0])]
        xd, xp = _pick(mda, scans, x, 1, "x")
        yd, yp2 = _pick(mda, scans, y, 0, "y")
        yp = yp2
        recorded = min(outer.current_point, n_rows)
        estimated = ()
        if 0 in (xd, yd) and n_rows > recorded:
            if recorded < 2:
                logger.warning(
                    "%s: row %d (running when the scan stopped) is left out: its outer position "
                    "was not recorded, and %d finished row(s) are too few to extrapolate it",
                    where,
                    recorded + 1,
                    recorded,
                )
                n_rows = recorded
                if n_rows == 0:
                    raise InputError(
                        f"{where}: the 2-D scan finished no row, so no point has a recorded "
                        "outer position; give a scan that ran at least one row"
                    )
            else:
                estimated = tuple(range(recorded, n_rows))
        rows_used = outer.inner[:n_rows]
        counts = np.array([s.current_point for s in rows_used], dtype=np.int64)
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
        cols = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        per_axis = []
        for dim, p in ((xd, xp), (yd, yp2)):
            if dim == 0:
                values = _outer_values(_acquired(p, recorded, where, "the outer scan"), n_rows)
                per_axis.append(np.repeat(values, counts))
            else:
                per_axis.append(
                    np.concatenate([_inner_values(s, p, i, where) for i, s in enumerate(rows_used)])
                )
        x_raw, y_raw = per_axis
        shape = (n_rows, max(s.requested_points for s in rows_used))
    else:
        raise InputError(f"{where}: a {mda.rank}-D scan; only 1-D and 2-D scans give positions")
    x_unit = xp.unit
    y_unit = yp.unit if yp is not None else ""
    x_factor, y_factor = micrometres_per(x_unit), micrometres_per(y_unit)
    return ScanPositions(
        x_um=x_raw * x_factor if x_factor is not None else x_raw,
        y_um=y_raw * y_factor if y_factor is not None else y_raw,
        shape=shape,
        row=rows,
        col=cols,
        names=(xp.name, yp.name if yp is not None else None),
        units=("µm" if x_factor is not None else x_unit, "µm" if y_factor is not None else y_unit),
        file_units=(x_unit, y_unit),
        requested_shape=tuple(mda.dimensions),
        scan_number=mda.scan_number,
        estimated_rows=estimated,
    )


def _inner_values(scan: MdaScan, p: MdaPositioner, row: int, where: str) -> npt.NDArray[np.float64]:
    """Positioner ``p``'s acquired values in the inner scan of one row (matched by name and number)."""
    match = next((q for q in scan.positioners if q.name == p.name and q.number == p.number), None)
    if match is None:
        raise InputError(
            f"{where}: the inner scan of row {row + 1} has no positioner {p.name!r} (the first "
            "row has); the file is inconsistent: name a positioner that every row has"
        )
    return _acquired(match, scan.current_point, where, f"the inner scan of row {row + 1}")
