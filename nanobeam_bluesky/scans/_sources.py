"""Scans on disk as a :class:`ScanSource`: frames read a chunk at a time, and where each was taken.

Readers for what beamlines already write:

- HDF5: our scan files and areaDetector / NeXus files (frames at ``/entry/data/data``, positions
  where the file has them: our ``x_um``/``y_um``, or areaDetector NDAttributes);
- a directory of TIFF frames, one per scan point, in acquisition order (file names sorted by
  the numbers in them);
- positions from a CSV file or an APS sscan MDA file (:func:`read_positions`).

A Tiled URI of a raw run is read by :mod:`nanobeam_bluesky.tiled` (it needs a client).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import InputError
from ..formats import mda_positions, micrometres_per, read_mda
from ..physics import Instrument, roi_origin

__all__ = [
    "HDF5_FRAME_DATASETS",
    "ScanPositionsTable",
    "ScanSource",
    "grid_of_positions",
    "open_hdf5_scan",
    "open_scan",
    "open_tiff_directory",
    "read_positions",
    "tiff_frame_files",
]

#: Where areaDetector / NeXus files keep their frames, looked for in this order.
HDF5_FRAME_DATASETS = ("/entry/data/data", "/entry/instrument/detector/data", "/data")
#: areaDetector / NeXus dataset names taken as the sample x and y positions (lower case).
_X_NAMES = ("x_um", "x", "samx", "sample_x", "samplex", "sx", "stage_x", "fine_x")
_Y_NAMES = ("y_um", "y", "samy", "sample_y", "sampley", "sy", "stage_y", "fine_y")


def _um(values: np.ndarray, units: str | None, what: str) -> np.ndarray:
    factor = micrometres_per(units or "um")
    if factor is None:
        raise InputError(f"{what} is in {units!r}; give positions in um, mm or nm")
    return np.asarray(values, dtype=np.float64) * factor


@dataclass(frozen=True)
class ScanPositionsTable:
    """Where each frame of a scan was taken, in acquisition order.

    ``x_um``/``y_um`` (n,) sample positions in µm; ``shape`` the scan grid ((rows, cols) or
    (n,)); ``row``/``col`` each point's place on that grid (None for a 1-D scan).
    """

    x_um: np.ndarray
    y_um: np.ndarray
    shape: tuple[int, ...]
    row: np.ndarray | None = None
    col: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.x_um)


def grid_of_positions(x_um: np.ndarray, y_um: np.ndarray, source: str = "") -> ScanPositionsTable:
    """The raster grid that positions (µm, acquisition order) lie on; 1-D if they form none.

    Rows are the distinct y values (within a quarter of the smallest step), columns the
    distinct x values; a raster, snake or not, gives (rows, cols) with each point placed.
    """
    x = np.asarray(x_um, dtype=np.float64).ravel()
    y = np.asarray(y_um, dtype=np.float64).ravel()
    n = len(x)

    def levels(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each value's level index and the levels: gaps of at least a third of the typical step
        (the median of the gaps above a fifth of the largest) separate levels; encoder jitter does not."""
        order = np.sort(v)
        gaps = np.diff(order)
        largest = float(gaps.max(initial=0.0))
        if largest <= 1e-9 * max(1.0, float(np.abs(order).max(initial=0.0))):
            return np.zeros(len(v), dtype=np.int64), order[:1]
        step = float(np.median(gaps[gaps > 0.2 * largest]))
        starts = np.flatnonzero(gaps > step / 3) + 1
        centres = np.array([g.mean() for g in np.split(order, starts)])
        edges = (centres[1:] + centres[:-1]) / 2
        return np.searchsorted(edges, v), centres

    if n >= 4 and np.isfinite(x).all() and np.isfinite(y).all():
        cols, x_levels = levels(x)
        rows, y_levels = levels(y)
        shape = (len(y_levels), len(x_levels))
        occupied = len(set(zip(rows.tolist(), cols.tolist(), strict=True)))
        # A grid when every point has its own cell and the grid is mostly full (a last row may be short).
        if shape[0] > 1 and shape[1] > 1 and occupied == n and n > (shape[0] - 1) * shape[1]:
            return ScanPositionsTable(x, y, shape, rows, cols, source)
    return ScanPositionsTable(x, y, (n,), None, None, source)


def _read_csv_positions(path: Path) -> ScanPositionsTable:
    try:
        with path.open(newline="") as f:
            lines = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read as CSV text ({exc}); give a CSV of x,y positions") from exc
    reader = csv.reader(lines)
    rows = [r for r in reader]
    if not rows:
        raise InputError(f"{path} holds no positions; give a CSV with columns x_um,y_um (or x_mm,y_mm)")
    header = [h.strip().lower() for h in rows[0]]
    x_col = next((i for i, h in enumerate(header) if re.fullmatch(r"x(_(um|µm|mm|nm))?", h)), None)
    y_col = next((i for i, h in enumerate(header) if re.fullmatch(r"y(_(um|µm|mm|nm))?", h)), None)
    if x_col is None or y_col is None:
        raise InputError(
            f"{path}: the first line must name the columns, e.g. 'x_um,y_um' (or x_mm, x_nm); got {rows[0]}"
        )
    try:
        data = np.array([[float(r[x_col]), float(r[y_col])] for r in rows[1:]], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise InputError(f"{path}: a row is not two numbers ({exc}); fix or remove it") from exc
    if len(data) == 0:
        raise InputError(f"{path} names its columns but holds no positions")
    unit_of = {h: (h.split("_", 1)[1] if "_" in h else "um") for h in (header[x_col], header[y_col])}
    x = _um(data[:, 0], unit_of[header[x_col]], f"{path} column {header[x_col]}")
    y = _um(data[:, 1], unit_of[header[y_col]], f"{path} column {header[y_col]}")
    return grid_of_positions(x, y, source=str(path))


def read_positions(path: str | Path) -> ScanPositionsTable:
    """A scan's positions (µm) and grid from a CSV (columns ``x_um,y_um``; or ``_mm``/``_nm``)
    or an APS sscan MDA file (the inner positioner is x, the outer y)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no positions file at {path}")
    with path.open("rb") as f:
        head = f.read(64)
    if path.suffix.lower() == ".mda" or (
        len(head) >= 4 and head[:4] in (b"\x3f\xa6\x66\x66", b"\x3f\xb3\x33\x33")
    ):
        positions = mda_positions(read_mda(path))
        if positions.units[0] != "µm" or positions.units[1] not in ("µm", ""):
            raise InputError(
                f"{path}: positioners {positions.names} are in {positions.file_units}, not a length; "
                "name the sample-stage positioners (x, y) of this scan"
            )
        two_d = len(positions.shape) == 2
        return ScanPositionsTable(
            np.asarray(positions.x_um, dtype=np.float64),
            np.asarray(positions.y_um, dtype=np.float64),
            tuple(int(s) for s in positions.shape),
            np.asarray(positions.row, dtype=np.int64) if two_d else None,
            np.asarray(positions.col, dtype=np.int64) if two_d else None,
            str(path),
        )
    return _read_csv_positions(path)


@dataclass
class ScanSource:
    """The frames of one scan, read a chunk at a time (raw detector images or ROIs, counts).

    ``read(start, stop)`` gives frames ``start..stop-1`` as (n, H, W) in the detector's own
    orientation; ``positions`` says where they were taken (None: unknown, maps over the frame
    index); ``roi_center_px`` is the (row, col) of the central reflected ray on the detector
    (raw pixels) where the file says it.
    """

    name: str
    n_frames: int
    frame_shape: tuple[int, int]
    read_block: Callable[[int, int], np.ndarray]
    positions: ScanPositionsTable | None = None
    roi_center_px: tuple[float, float] | None = None
    instrument: Instrument | None = None
    #: Simulated files only: the true maps (strain, omega_deg, chi_deg) on the scan grid.
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    #: HDF5 files: the dataset the frames are read from, and its shape as stored ((N, H, W),
    #: (N, 1, H, W) or (Y, X, H, W)).
    dataset: str | None = None
    frames_shape: tuple[int, ...] | None = None

    @property
    def scan_shape(self) -> tuple[int, ...]:
        """The scan as the frames are stored: (Y, X) for a (Y, X, H, W) stack, else (n_frames,)."""
        return _scan_shape(self.frames_shape[:-2] if self.frames_shape else (), self.n_frames)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.read_block(start, stop))

    def roi_reader(self, roi: int, center: tuple[float, float] | None) -> Callable[[int, int], np.ndarray]:
        """A reader of frames ``start..stop-1`` cut to the ``roi`` x ``roi`` ROI the model takes
        (raw pixels, still in the detector's orientation); frames already that size pass as they are."""
        height, width = self.frame_shape
        if (height, width) == (roi, roi) or (height, width) == (roi // 2, roi // 2):
            return self.read
        center = center or self.roi_center_px
        if center is None:
            raise InputError(
                f"{self.name}: frames are {height} x {width} detector images and the file does not say "
                f"where the reflection is; give --roi-center ROW COL (the pixel of the central reflected "
                f"ray) to cut the {roi} x {roi} ROI the model takes"
            )
        row0, col0 = roi_origin(center, roi, (height, width))

        def read_roi(start: int, stop: int) -> np.ndarray:
            return np.ascontiguousarray(self.read(start, stop)[:, row0 : row0 + roi, col0 : col0 + roi])

        return read_roi

    def with_positions(self, positions: ScanPositionsTable) -> ScanSource:
        if len(positions) != self.n_frames:
            raise InputError(
                f"{positions.source or 'the positions'} has {len(positions)} positions for the "
                f"{self.n_frames} frames of {self.name}; give the positions of this scan"
            )
        self.positions = positions
        return self


def _scan_shape(lead: tuple[int, ...], n: int) -> tuple[int, ...]:
    # (Y, X, H, W) is a grid; (N, 1, H, W) is areaDetector's N frames of one image each
    return tuple(int(s) for s in lead) if len(lead) == 2 and lead[1] != 1 else (n,)


def _frames_dataset(h5: h5py.File, path: Path, dataset: str | None) -> h5py.Dataset:
    names = [dataset] if dataset else list(HDF5_FRAME_DATASETS)
    for name in names:
        obj = h5.get(name)
        if isinstance(obj, h5py.Dataset) and obj.ndim >= 3:
            return obj
    found: list[str] = []
    h5.visititems(
        lambda n, o: found.append(f"/{n} {o.shape}") if isinstance(o, h5py.Dataset) and o.ndim >= 3 else None
    )
    hint = f"; image datasets in it: {', '.join(found[:5])}" if found else "; it holds no image stack"
    raise InputError(f"{path.name} has no frames at {' or '.join(names)}{hint}; name them with --dataset")


def _hdf5_positions(h5: h5py.File, n: int, scan_shape: tuple[int, ...]) -> ScanPositionsTable | None:
    """Positions in the file: ours (/entry/data/x_um, y_um), or NeXus/areaDetector 1-D datasets."""
    groups = ["/entry/data", "/entry/instrument/NDAttributes", "/entry/sample"]
    found: dict[str, np.ndarray] = {}
    for group_name in groups:
        group = h5.get(group_name)
        if not isinstance(group, h5py.Group):
            continue
        for key, obj in group.items():
            if not isinstance(obj, h5py.Dataset) or obj.size != n:
                continue
            name = key.lower()
            for axis, candidates in (("x", _X_NAMES), ("y", _Y_NAMES)):
                if axis not in found and name in candidates:
                    units = obj.attrs.get("units", "um" if name.endswith("_um") else None)
                    if isinstance(units, bytes):
                        units = units.decode()
                    found[axis] = _um(np.asarray(obj[()]).reshape(-1), units, f"{group_name}/{key}")
    if "x" not in found or "y" not in found:
        return None
    if len(scan_shape) == 2:  # a file that stores the grid
        rows, cols = np.divmod(np.arange(n), scan_shape[1])
        return ScanPositionsTable(found["x"], found["y"], scan_shape, rows, cols, "the file")
    return grid_of_positions(found["x"], found["y"], source="the file")


def open_hdf5_scan(
    path: str | Path, dataset: str | None = None, *, check: Callable[[h5py.File], None] | None = None
) -> ScanSource:
    """An HDF5 scan: our scan files, or areaDetector / NeXus files (frames (N, H, W),
    (N, 1, H, W) or (Y, X, H, W)).

    ``check`` is called with the open file before anything is read from it (the Tiled server
    refuses files that link to other files).
    """
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path.name} is not a readable HDF5 file ({exc}); check the path") from exc
    try:
        if check is not None:
            check(h5)
        frames = _frames_dataset(h5, path, dataset)
        if frames.dtype.kind not in "uif":
            raise InputError(f"{path.name}:{frames.name} holds {frames.dtype}, not counts")
        height, width = frames.shape[-2:]
        lead = frames.shape[:-2]
        n = int(np.prod(lead))
        scan_shape = _scan_shape(lead, n)
        positions = _hdf5_positions(h5, n, scan_shape)
        center = frames.attrs.get("roi_center_px")
        roi_center = None if center is None else tuple(float(c) for c in np.ravel(center)[:2])
        instrument = None
        if "/entry/instrument/nanobeam_instrument" in h5:
            raw = h5["/entry/instrument/nanobeam_instrument"][()]
            instrument = Instrument.from_dict(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
        truth = {}
        if "/entry/sample/truth" in h5:
            truth = {k: np.asarray(v[()]) for k, v in h5["/entry/sample/truth"].items()}
    except BaseException:
        h5.close()
        raise
    flat_shape = (n, height, width)

    def read_block(start: int, stop: int) -> np.ndarray:
        if len(lead) == 1:
            return frames[start:stop]
        if len(lead) == 2 and lead[1] == 1:  # (N, 1, H, W)
            return frames[start:stop, 0]
        # (Y, X, H, W): whole rows at a time, then the span asked for
        cols = lead[1]
        r0, r1 = start // cols, (stop - 1) // cols + 1
        block = frames[r0:r1].reshape(-1, height, width)
        return block[start - r0 * cols : stop - r0 * cols]

    return ScanSource(
        name=path.name,
        n_frames=flat_shape[0],
        frame_shape=(int(height), int(width)),
        read_block=read_block,
        positions=positions,
        roi_center_px=roi_center,  # type: ignore[arg-type]
        instrument=instrument,
        truth=truth,
        close=h5.close,
        dtype=frames.dtype,
        dataset=frames.name,
        frames_shape=tuple(int(s) for s in frames.shape),
    )


def _read_tiff(path: Path) -> np.ndarray:
    """One TIFF file's image; the name is a name (``tifffile.imread`` would take * or ? in it as
    a pattern)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.asarray()


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def tiff_frame_files(directory: str | Path) -> list[Path]:
    """The TIFF files of a directory (``*.tif``, ``*.tiff``; hidden files left out) in acquisition
    order: sorted by the numbers in their names (``scan_2`` before ``scan_10``)."""
    return sorted(
        (
            p
            for p in Path(directory).iterdir()
            if p.suffix.lower() in (".tif", ".tiff") and not p.name.startswith(".") and p.is_file()
        ),
        key=_natural_key,
    )


def open_tiff_directory(directory: str | Path, files: list[Path] | None = None) -> ScanSource:
    """A directory of TIFF frames, one per scan point; acquisition order = the numbers in the names.

    ``files``: the frames in order, when the caller has listed them (default
    :func:`tiff_frame_files`).
    """

    directory = Path(directory)
    files = tiff_frame_files(directory) if files is None else list(files)
    if not files:
        raise InputError(f"{directory} holds no .tif/.tiff files; give a directory of TIFF frames")
    try:
        first = _read_tiff(files[0])
    except Exception as exc:
        raise InputError(f"{files[0].name} is not a readable TIFF ({exc}); check the file") from exc
    if first.ndim != 2:
        raise InputError(f"{files[0].name} holds an array of shape {first.shape}, not one 2-D frame")

    def read_block(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *first.shape), dtype=first.dtype)
        for i, path in enumerate(files[start:stop]):
            try:
                frame = _read_tiff(path)
            except Exception as exc:
                raise InputError(f"{path.name} is not a readable TIFF ({exc}); replace or remove it") from exc
            if frame.shape != first.shape:
                raise InputError(
                    f"{path.name} is {frame.shape}, the first frame {first.shape}; every frame must be "
                    "the same size"
                )
            out[i] = frame
        return out

    return ScanSource(
        name=directory.name,
        n_frames=len(files),
        frame_shape=(int(first.shape[0]), int(first.shape[1])),
        read_block=read_block,
        dtype=first.dtype,
    )


def open_scan(path: str | Path, *, dataset: str | None = None) -> ScanSource:
    """A scan on disk by its kind: an HDF5 file, or a directory of TIFF frames."""
    path = Path(path)
    if path.is_dir():
        return open_tiff_directory(path)
    if not path.exists():
        raise InputError(f"no scan at {path}; give an HDF5 file, a directory of TIFF frames or a Tiled URI")
    with path.open("rb") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return open_hdf5_scan(path, dataset)
    if magic[:4] in (b"II*\x00", b"MM\x00*"):
        raise InputError(f"{path} is a single TIFF; give the directory of the scan's TIFF frames")
    raise InputError(
        f"{path} is not a scan this reads (HDF5, a directory of TIFFs, or a Tiled URI http(s)://...); "
        "convert it or name the right file"
    )


def read_spread(
    frames: Any,
    roi: int,
    roi_center_px: tuple[float, float] | None,
    max_frames: int,
    progress: bool = False,
) -> np.ndarray:
    """At most ``max_frames`` frames spread evenly over a scan, as the ``roi`` x ``roi`` raw ROIs
    the model takes (or the frames as they are when already that size): from a
    :class:`ScanSource` (read in blocks when it is all wanted, else frame by frame) or an array."""
    if isinstance(frames, ScanSource):
        from tqdm.auto import tqdm

        read = frames.roi_reader(roi, roi_center_px)
        n = frames.n_frames
        spans = (
            [(i, min(i + 256, n)) for i in range(0, n, 256)]
            if n <= max_frames
            else [(int(i), int(i) + 1) for i in np.unique(np.linspace(0, n - 1, max_frames).round())]
        )
        with tqdm(
            total=sum(b - a for a, b in spans), unit="frame", desc="reading", disable=not progress
        ) as bar:
            parts = []
            for a, b in spans:
                parts.append(read(a, b))
                bar.update(b - a)
        return np.concatenate(parts)
    arr = np.asarray(frames)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if len(arr) > max_frames:
        arr = arr[np.unique(np.linspace(0, len(arr) - 1, max_frames).round().astype(int))]
    return arr
