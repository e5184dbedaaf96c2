"""Scans in the formats beamlines write, served through the readers ``nanobeam predict`` uses
(:mod:`nanobeam_bluesky.scans`), each as a container in the ``xarray_dataset`` convention:

An areaDetector / NeXus HDF5 file (frames at ``/entry/data/data``, without our ``x_um``/``y_um``;
:class:`AreaDetectorScanAdapter`)::

    frames      raw counts (point, det_row, det_col), from (N, H, W) or (N, 1, H, W) stacks, or
                (scan_y, scan_x, det_row, det_col) from (Y, X, H, W)
    binned      float32 (..., row, col): the ROI around the central reflected ray, binned, when the
                ROI centre is known (the server's roi_center_px, else the frames' attribute)
    x_um, y_um  where the file has positions (our names, or NDAttributes such as SampleX, with
                their units), micrometres; row, col when the points of a flat stack form a grid

A directory of TIFF frames, one per point (:class:`TiffScanAdapter`)::

    frames      raw counts (point, det_row, det_col) in acquisition order: file names sorted by
                the numbers in them (scan_2 before scan_10)
    binned      when the server is given the ROI centre
    x_um, y_um, row, col   when the directory holds ``positions.csv`` or one ``*.mda`` file

An APS sscan MDA file (:class:`MdaScanAdapter`)::

    x_um, y_um, row, col   the positions of the acquired points, in acquisition order

HDF5 files are opened through the guard (refused while they hold links to other files) and every
TIFF or positions file a node reads must resolve inside the served directory (else 403).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import Spec

from ...errors import InputError
from ...formats import mda_positions, read_mda
from ...physics import Instrument
from ...scanfile import ScanFileError
from ...scans import (
    ScanPositionsTable,
    open_hdf5_scan,
    open_tiff_directory,
    read_positions,
    tiff_frame_files,
)
from ._arrays import ContainerAdapter, coordinate
from ._frames import (
    SCAN_SPEC,
    HDF5Frames,
    ScanFramesAdapter,
    TiffFramesAdapter,
    binned_frames,
    frame_chunks,
)
from ._guard import check_hdf5, contained_path, named_instrument

__all__ = [
    "AREA_DETECTOR_KIND",
    "MDA_KIND",
    "MDA_SUFFIX",
    "POSITIONS_SPEC",
    "TIFF_KIND",
    "AreaDetectorScanAdapter",
    "MdaScanAdapter",
    "TiffScanAdapter",
]

#: ``kind`` in the metadata of each node.
AREA_DETECTOR_KIND = "areaDetector/NeXus"
TIFF_KIND = "TIFF frames"
MDA_KIND = "APS sscan MDA"
#: Spec of an MDA file's node (positions only); scans get ``nanobeam-scan``.
POSITIONS_SPEC = Spec("nanobeam-positions", version="1")
MDA_SUFFIX = ".mda"
#: The positions file a TIFF directory may hold (else its one ``*.mda`` file).
POSITIONS_CSV = "positions.csv"


@contextlib.contextmanager
def _shown_as(path: Path, shown: str) -> Iterator[None]:
    """Errors of the readers, which name ``path`` as given, name it as the client sees it."""
    try:
        yield
    except (InputError, OSError) as exc:
        text = str(exc)
        if str(path) not in text:
            raise
        raise ScanFileError(text.replace(str(path), shown)) from exc


def _instrument(
    value: Instrument | str | dict[str, Any] | None, instrument_dir: str | Path | None
) -> Instrument | None:
    return None if value is None else named_instrument(value, instrument_dir)


def _positions_nodes(
    positions: ScanPositionsTable | None, scan_shape: tuple[int, ...], scan_dims: tuple[str, ...]
) -> dict[str, Any]:
    """x_um, y_um on the frames' scan dims; row, col (each point's place on the positions' grid)
    when the frames are a flat stack and the positions form a 2-D grid."""
    if positions is None:
        return {}
    nodes = {
        "x_um": coordinate(positions.x_um.reshape(scan_shape), scan_dims, "um"),
        "y_um": coordinate(positions.y_um.reshape(scan_shape), scan_dims, "um"),
    }
    if len(scan_shape) == 1 and positions.row is not None and positions.col is not None:
        nodes["row"] = coordinate(positions.row, scan_dims, None, grid_shape=list(positions.shape))
        nodes["col"] = coordinate(positions.col, scan_dims, None, grid_shape=list(positions.shape))
    return nodes


def _scan_metadata(
    name: str,
    kind: str,
    scan_shape: tuple[int, ...],
    detector_shape: tuple[int, int],
    dtype: np.dtype,
    positions: ScanPositionsTable | None,
    positions_from: str | None,
    center: tuple[float, float] | None,
    roi: int,
    binning: int,
    instrument: Instrument,
    roi_hint: str,
) -> dict[str, Any]:
    """A scan node's metadata; ``positions_from`` names where the positions came from or, when
    there are none, says how to give them; ``roi_hint`` says how to give the ROI centre."""
    notes = []
    if positions is None:
        notes.append(f"no positions: {positions_from}")
    if center is None:
        notes.append(f"no ROI centre known: {roi_hint} to serve 'binned' frames")
    return {
        "kind": kind,
        "file": name,
        "scan_shape": list(scan_shape),
        "detector_shape": list(detector_shape),
        "dtype": str(dtype),
        "units": {"frames": "counts", **({"x_um": "um", "y_um": "um"} if positions is not None else {})},
        "positions": None if positions is None else positions_from,
        "grid_shape": None if positions is None else list(positions.shape),
        "roi_center_px": list(center) if center is not None else None,
        "roi": roi,
        "binning": binning,
        "instrument": instrument.to_dict(),
        **({"note": "; ".join(notes)} if notes else {}),
    }


class AreaDetectorScanAdapter(ContainerAdapter):
    """An areaDetector / NeXus HDF5 file, read as ``nanobeam predict`` reads it
    (:func:`nanobeam_bluesky.scans.open_hdf5_scan`): see the module docstring.

    Args of :meth:`from_path`: ``dataset`` (the frames; default: where areaDetector and NeXus keep
    them), ``roi_center_px``, ``roi``, ``binning``, ``instrument`` and ``instrument_dir`` as for
    :class:`~nanobeam_bluesky.tiled.adapters.ExperimentalScanAdapter`.
    """

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        dataset: str | None = None,
        roi_center_px: tuple[float, float] | list[float] | None = None,
        roi: int | None = None,
        binning: int | None = None,
        instrument: Instrument | str | dict[str, Any] | None = None,
        instrument_dir: str | Path | None = None,
        name: str | None = None,
    ) -> AreaDetectorScanAdapter:
        path = Path(path)
        name = name or path.name
        source = open_hdf5_scan(path, dataset, check=lambda h5: check_hdf5(h5, name))
        source.close()  # everything but the frames is read; the frames are read per request
        stored = source.frames_shape or ()
        if len(stored) not in (3, 4) or source.dataset is None:
            raise ScanFileError(
                f"{name}:{source.dataset} has shape {stored}; expected frames (N, H, W), (N, 1, H, W) "
                "or (Y, X, H, W)"
            )
        scan_shape = source.scan_shape
        scan_dims = ("scan_y", "scan_x") if len(scan_shape) == 2 else ("point",)
        detector_shape = source.frame_shape
        read = HDF5Frames(
            path, source.dataset, singleton_axis=1 if len(stored) == 4 and len(scan_shape) == 1 else None
        )
        shape = (*scan_shape, *detector_shape)
        children: dict[str, Any] = {
            "frames": ScanFramesAdapter(
                read,
                ArrayStructure(
                    data_type=BuiltinDtype.from_numpy_dtype(source.dtype),
                    shape=shape,
                    chunks=frame_chunks(shape, source.dtype.itemsize),
                    dims=(*scan_dims, "det_row", "det_col"),
                ),
                metadata={"attrs": {"units": "counts", "dataset": source.dataset}},
                specs=[Spec("xarray_data_var")],
            )
        }
        chosen = _instrument(instrument, instrument_dir) or source.instrument or Instrument()
        roi = int(roi or chosen.roi_pixels)
        binning = int(binning or chosen.binning)
        center = roi_center_px if roi_center_px is not None else source.roi_center_px
        if center is not None:
            center = (float(center[0]), float(center[1]))
            children["binned"] = binned_frames(
                read, name, scan_shape, scan_dims, detector_shape, center, roi, binning, chosen
            )
        children.update(_positions_nodes(source.positions, scan_shape, scan_dims))
        md = _scan_metadata(
            name,
            AREA_DETECTOR_KIND,
            scan_shape,
            detector_shape,
            source.dtype,
            source.positions,
            "the file" if source.positions is not None else "the file has no x/y positions of its points",
            center,
            roi,
            binning,
            chosen,
            "give roi_center_px in the server config (or the frames' roi_center_px attribute)",
        )
        md["dataset"] = source.dataset
        md["frames_shape"] = list(stored)
        return cls(children, metadata=md, specs=[SCAN_SPEC, Spec("xarray_dataset")])


def _positions_file(directory: Path, root: Path, name: str) -> Path | None:
    """The directory's ``positions.csv``, else its one ``*.mda`` file (resolved inside ``root``)."""
    csv = directory / POSITIONS_CSV
    if csv.is_file():
        return contained_path(csv, root, name)
    mdas = sorted(
        p for p in directory.iterdir() if p.suffix.lower() == MDA_SUFFIX and not p.name.startswith(".")
    )
    if len(mdas) > 1:
        raise ScanFileError(
            f"{name} holds {len(mdas)} MDA files ({', '.join(p.name for p in mdas[:4])}); keep the one "
            f"of this scan, or write its positions to {POSITIONS_CSV}"
        )
    return contained_path(mdas[0], root, name) if mdas else None


class TiffScanAdapter(ContainerAdapter):
    """A directory of TIFF frames, one per scan point (see the module docstring); the frames are
    served by tiled's TIFF sequence adapter (:class:`._frames.TiffFramesAdapter`) over the files
    in acquisition order (:func:`nanobeam_bluesky.scans.tiff_frame_files`)."""

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        *,
        files: list[Path] | None = None,
        root: str | Path | None = None,
        roi_center_px: tuple[float, float] | list[float] | None = None,
        roi: int | None = None,
        binning: int | None = None,
        instrument: Instrument | str | dict[str, Any] | None = None,
        instrument_dir: str | Path | None = None,
        name: str | None = None,
    ) -> TiffScanAdapter:
        """``files``: the directory's TIFF files in acquisition order (default
        :func:`~nanobeam_bluesky.scans.tiff_frame_files`); ``root``: the served directory they
        (and the positions file) must resolve inside (default: ``directory``)."""
        directory = Path(directory)
        name = name or directory.name
        inside = Path(root).resolve() if root is not None else directory.resolve()
        listed = tiff_frame_files(directory) if files is None else files
        frame_files = [contained_path(p, inside, name) for p in listed]
        source = open_tiff_directory(directory, frame_files)
        positions_file = _positions_file(directory, inside, name)
        if positions_file is not None:
            with _shown_as(positions_file, f"{name}/{positions_file.name}"):
                source.with_positions(read_positions(positions_file))
        n = source.n_frames
        frames = TiffFramesAdapter(
            frame_files,
            ArrayStructure(
                data_type=BuiltinDtype.from_numpy_dtype(source.dtype),
                shape=(n, *source.frame_shape),
                chunks=((1,) * n, (source.frame_shape[0],), (source.frame_shape[1],)),
                dims=("point", "det_row", "det_col"),
            ),
            metadata={"attrs": {"units": "counts", "first": listed[0].name, "last": listed[-1].name}},
            specs=[Spec("xarray_data_var")],
        )
        children: dict[str, Any] = {"frames": frames}
        chosen = _instrument(instrument, instrument_dir) or Instrument()
        roi = int(roi or chosen.roi_pixels)
        binning = int(binning or chosen.binning)
        center = (float(roi_center_px[0]), float(roi_center_px[1])) if roi_center_px is not None else None
        if center is not None:
            children["binned"] = binned_frames(
                frames.read, name, (n,), ("point",), source.frame_shape, center, roi, binning, chosen
            )
        children.update(_positions_nodes(source.positions, (n,), ("point",)))
        md = _scan_metadata(
            name,
            TIFF_KIND,
            (n,),
            source.frame_shape,
            source.dtype,
            source.positions,
            positions_file.name
            if positions_file is not None
            else f"put {POSITIONS_CSV} (columns x_um,y_um) or the scan's MDA file in the directory",
            center,
            roi,
            binning,
            chosen,
            "give roi_center_px in the server config",
        )
        md["directory"] = md.pop("file")
        return cls(children, metadata=md, specs=[SCAN_SPEC, Spec("xarray_dataset")])


class MdaScanAdapter(ContainerAdapter):
    """An APS sscan MDA file's positions (:func:`nanobeam_bluesky.formats.mda_positions`) and
    what the file says of its scan; see the module docstring."""

    @classmethod
    def from_path(cls, path: str | Path, *, name: str | None = None) -> MdaScanAdapter:
        path = Path(path)
        name = name or path.name
        with _shown_as(path, name):
            positions = mda_positions(mda := read_mda(path))
        if positions.units[0] != "µm" or positions.units[1] not in ("µm", ""):
            raise ScanFileError(
                f"{name}: positioners {positions.names} are in {positions.file_units}, not a length; "
                "this node serves sample-stage positions (x, y) in um"
            )
        dims = ("point",)
        children = {
            "x_um": coordinate(positions.x_um, dims, "um"),
            "y_um": coordinate(positions.y_um, dims, "um"),
            "row": coordinate(positions.row, dims, None),
            "col": coordinate(positions.col, dims, None),
        }
        axes = ("x", "y")
        md = {
            "kind": MDA_KIND,
            "file": name,
            "version": round(float(mda.version), 2),
            "scan_number": int(positions.scan_number),
            "rank": int(mda.rank),
            "scan_name": mda.scan.name,
            "time_stamp": mda.scan.time_stamp,
            "shape": list(positions.shape),
            "requested_shape": list(positions.requested_shape),
            "n_points": positions.n_points,
            "complete": positions.complete,
            "estimated_rows": list(positions.estimated_rows),
            "positioners": {
                axis: {"name": positions.names[i], "units": "um", "file_units": positions.file_units[i]}
                for i, axis in enumerate(axes)
                if positions.names[i] is not None
            },
            "units": {"x_um": "um", "y_um": "um"},
        }
        return cls(children, metadata=md, specs=[POSITIONS_SPEC, Spec("xarray_dataset")])
