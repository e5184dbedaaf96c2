"""Experimental scan files (see :mod:`nanobeam_bluesky.scanfile`) and directories of them.

One scan file is served as a container in the ``xarray_dataset`` convention::

    frames   raw detector counts (scan_y, scan_x, det_row, det_col) or (point, det_row, det_col)
    binned   float32 (scan_y, scan_x, row, col): the ROI around the central reflected ray, binned
             (2 x 2 sum by default: the 64 x 64 frames the model takes); present when the ROI
             centre is known (from the server config, the registration, or the file)
    x_um     stage x position of every point, micrometres
    y_um     stage y position of every point, micrometres

A directory of scan files (and sub-directories) is served as a live container: files that appear
later are listed at the next request. Besides our scan files it serves what beamlines write, as
``nanobeam predict`` reads it (:mod:`.beamline`): areaDetector / NeXus HDF5 files (frames at
``/entry/data/data`` without our ``x_um``/``y_um``), sub-directories of TIFF frames, and APS
sscan MDA files (positions). A corrupt or truncated file is listed with an ``error`` in its
metadata; opening it gives a 422 error naming the file and the problem, and the server carries on.
Nothing outside the directory is served: links leading out of it are not listed, and a TIFF or
positions file of a scan that leads out is refused (403).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import h5py
from tiled.adapters.mapping import MapAdapter
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.container import ContainerStructure
from tiled.structures.core import Spec
from tiled.utils import path_from_uri

from ...physics import Instrument
from ...scanfile import ScanFileError, ScanLayout, ScanSummary, inspect_scan_file
from ...scans import HDF5_FRAME_DATASETS, tiff_frame_files
from .._http import served_errors
from ._arrays import ContainerAdapter, check_parameters, coordinate
from ._frames import SCAN_SPEC, HDF5Frames, ScanFramesAdapter, binned_frames, frame_chunks
from ._guard import check_hdf5, named_instrument, open_hdf5
from .beamline import MDA_SUFFIX, AreaDetectorScanAdapter, MdaScanAdapter, TiffScanAdapter

if TYPE_CHECKING:
    from tiled.catalog.orm import Node
    from tiled.structures.data_source import DataSource

__all__ = [
    "SCAN_KIND",
    "SCAN_SPEC",
    "SCAN_SUFFIXES",
    "ExperimentalScanAdapter",
    "ScanDirectoryAdapter",
]

UNREADABLE_SPEC = Spec("nanobeam-scan-unreadable")
#: ``kind`` in the metadata of our scan files' nodes.
SCAN_KIND = "nanobeam scan file"
#: File name endings of the HDF5 files listed in a scan directory (MDA files are listed too).
SCAN_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs")


class ExperimentalScanAdapter(ContainerAdapter):
    """One experimental scan file, with coordinates and (optionally) ROI-binned frames.

    Args of :meth:`from_path` (also accepted as registration parameters by :meth:`from_catalog`):
        layout: dataset paths (:class:`~nanobeam_bluesky.scanfile.ScanLayout` or a dict).
        roi_center_px: (row, col) of the central reflected ray on the detector, raw pixels;
            default: the file's ``roi_center_px`` attribute. Without it no ``binned`` node.
        roi, binning: ROI side (raw pixels) and binning; default: the instrument's (128, 2).
        instrument: an Instrument, an inline config (dict), or the name of a config in
            ``instrument_dir`` (never a path; see ``named_instrument``); default: the one stored
            in the file, else physics.md's. Its detector orientation options apply to the binned
            frames.
        instrument_dir: where instrument names are looked up. Catalog entries get the server's
            (the class attribute, set by ``contained_catalog``).

    A file holding HDF5 external links, virtual datasets or external raw storage is refused.
    """

    #: Where ``instrument`` names of catalog entries are looked up (set per catalog).
    instrument_dir: ClassVar[str | Path | None] = None
    #: Registration parameters a catalog entry may carry.
    registration_parameters: ClassVar[tuple[str, ...]] = (
        "layout",
        "roi_center_px",
        "roi",
        "binning",
        "instrument",
    )

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        layout: ScanLayout | dict[str, Any] | None = None,
        roi_center_px: tuple[float, float] | list[float] | None = None,
        roi: int | None = None,
        binning: int | None = None,
        instrument: Instrument | str | dict[str, Any] | None = None,
        instrument_dir: str | Path | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ExperimentalScanAdapter:
        path = Path(path)
        layout = layout if isinstance(layout, ScanLayout) else ScanLayout.from_dict(layout)
        summary = inspect_scan_file(path, layout, check=lambda h5: check_hdf5(h5, path.name))
        instrument = _instrument(instrument, instrument_dir, summary)
        roi = int(roi or instrument.roi_pixels)
        binning = int(binning or instrument.binning)
        center = roi_center_px if roi_center_px is not None else summary.roi_center_px
        children: dict[str, Any] = {}
        scan_dims = summary.scan_dims
        raw_structure = ArrayStructure(
            data_type=BuiltinDtype.from_numpy_dtype(summary.frames_dtype),
            shape=summary.frames_shape,
            chunks=frame_chunks(summary.frames_shape, summary.frames_dtype.itemsize),
            dims=(*scan_dims, "det_row", "det_col"),
        )
        read = HDF5Frames(path, layout.frames)
        children["frames"] = ScanFramesAdapter(
            read,
            raw_structure,
            metadata={"attrs": {"units": "counts", "dataset": layout.frames}},
            specs=[Spec("xarray_data_var")],
        )
        if center is not None:
            center = (float(center[0]), float(center[1]))
            children["binned"] = binned_frames(
                read,
                path.name,
                summary.scan_shape,
                scan_dims,
                summary.detector_shape,
                center,
                roi,
                binning,
                instrument,
            )
        with open_hdf5(path) as h5:
            for name in ("x_um", "y_um"):
                children[name] = coordinate(h5[getattr(layout, name)][()], scan_dims, "um")
        md = {
            "kind": SCAN_KIND,
            "attrs": {k: v for k, v in summary.attrs.items() if isinstance(v, (str, int, float, bool))},
            "file": path.name,
            "sample": summary.attrs.get("sample", ""),
            "format": summary.attrs.get("format", "unknown"),
            "scan_shape": list(summary.scan_shape),
            "detector_shape": list(summary.detector_shape),
            "roi_center_px": list(center) if center is not None else None,
            "roi": roi,
            "binning": binning,
            "layout": layout.to_dict(),
            "instrument": instrument.to_dict(),
            **(
                {}
                if center is not None
                else {
                    "note": "no ROI centre known: give roi_center_px in the server config to serve "
                    "'binned' frames"
                }
            ),
            **(metadata or {}),
        }
        return cls(children, metadata=md, specs=[SCAN_SPEC, Spec("xarray_dataset")])

    @classmethod
    def from_uris(cls, data_uri: str, **kwargs: Any) -> ExperimentalScanAdapter:
        return cls.from_path(path_from_uri(data_uri), instrument_dir=cls.instrument_dir, **kwargs)

    @classmethod
    def from_catalog(
        cls, data_source: DataSource[None], node: Node, /, **parameters: Any
    ) -> ExperimentalScanAdapter:
        uri = data_source.assets[0].data_uri
        with served_errors(Path(path_from_uri(uri)).name):
            check_parameters(parameters, cls.registration_parameters)
            return cls.from_path(
                path_from_uri(uri),
                metadata=dict(node.metadata_ or {}),
                instrument_dir=cls.instrument_dir,
                **parameters,
            )


def _instrument(
    value: Instrument | str | dict[str, Any] | None, instrument_dir: str | Path | None, summary: ScanSummary
) -> Instrument:
    if value is not None:
        return named_instrument(value, instrument_dir)
    if summary.instrument_json:
        return Instrument.from_dict(json.loads(summary.instrument_json))
    return Instrument()


def _areadetector_frames(path: Path, layout: ScanLayout, name: str) -> str | None:
    """The frames dataset of an areaDetector / NeXus file: frames (>= 3-D) at the layout's path or
    where those files keep them, and not our positions; None for our scan files (and for files
    whose errors our reader names best: unreadable, no frames anywhere)."""
    try:
        h5 = open_hdf5(path, name)  # refused (403) while it holds links to other files
    except OSError:
        return None
    with h5:
        if layout.x_um in h5 and layout.y_um in h5:
            return None
        for dataset in dict.fromkeys((layout.frames, *HDF5_FRAME_DATASETS)):
            obj = h5.get(dataset)
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 3:
                return dataset
    return None


_LISTED_SUFFIXES = (*SCAN_SUFFIXES, MDA_SUFFIX)


class _ScanFiles(Mapping[str, Any]):
    """Live view of a directory: scan files and sub-directories, nothing outside it."""

    def __init__(self, directory: Path, root: Path, options: dict[str, Any]) -> None:
        self.directory = directory
        self.root = root
        self.options = options

    def _entries(self) -> dict[str, Path]:
        """Listed names -> resolved paths: HDF5 and MDA files, sub-directories (of TIFF frames:
        a scan; else a directory of scans). Links that lead out of the root are left out."""
        entries: dict[str, Path] = {}
        try:
            children = sorted(self.directory.iterdir())
        except OSError:
            return entries
        for child in children:
            if child.name.startswith("."):
                continue
            try:
                resolved = child.resolve()
            except OSError:
                continue
            if not resolved.is_relative_to(self.root):
                continue  # a link leading outside the declared directory is never served
            if resolved.is_dir() or (resolved.is_file() and child.suffix.lower() in _LISTED_SUFFIXES):
                entries[child.name] = resolved
        return entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._entries()

    def __getitem__(self, key: str) -> Any:
        path = self._entries().get(key)
        if path is None:
            raise KeyError(key)
        options = self.options
        beamline = {k: options[k] for k in ("roi_center_px", "roi", "binning", "instrument")}
        with served_errors(key):
            if path.is_dir():
                tiffs = tiff_frame_files(path)
                if tiffs:
                    return TiffScanAdapter.from_directory(
                        path, files=tiffs, root=self.root, name=key, **beamline
                    )
                return ScanDirectoryAdapter(
                    _ScanFiles(path, self.root, self.options), metadata={"directory": key}
                )
            if Path(key).suffix.lower() == MDA_SUFFIX:  # as listed (the link's name, for a link)
                return MdaScanAdapter.from_path(path, name=key)
            dataset = _areadetector_frames(path, options["layout"], key)
            if dataset is not None:
                return AreaDetectorScanAdapter.from_path(path, dataset=dataset, name=key, **beamline)
            return ExperimentalScanAdapter.from_path(path, **options)

    def tolerant(self, key: str) -> Any:
        """Like ``self[key]``, but an unreadable file becomes a placeholder with its error."""
        try:
            return self[key]
        except Exception as exc:
            detail = getattr(exc, "detail", None) or str(exc)
            return ContainerAdapter({}, metadata={"file": key, "error": detail}, specs=[UNREADABLE_SPEC])


class ScanDirectoryAdapter(MapAdapter):
    """A directory of experimental scan files, listed live (see the module docstring)."""

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        *,
        layout: dict[str, Any] | None = None,
        roi_center_px: list[float] | tuple[float, float] | None = None,
        roi: int | None = None,
        binning: int | None = None,
        instrument: str | dict[str, Any] | None = None,
        instrument_dir: str | None = None,
    ) -> ScanDirectoryAdapter:
        """Serve ``directory``; the options apply to every file (see ExperimentalScanAdapter).

        ``instrument`` names a config in ``instrument_dir`` (or is an inline config).
        """
        root = Path(directory).expanduser().resolve()
        if not root.is_dir():
            raise ScanFileError(f"scan directory {root} does not exist; create it or fix the path")
        if instrument is not None:
            instrument = named_instrument(instrument, instrument_dir).to_dict()  # fail at start
        options = {
            "layout": ScanLayout.from_dict(layout),
            "roi_center_px": roi_center_px,
            "roi": roi,
            "binning": binning,
            "instrument": instrument,
        }
        return cls(_ScanFiles(root, root, options), metadata={"directory": root.name})

    def structure(self) -> ContainerStructure:
        return ContainerStructure(keys=list(self._mapping))

    def _items_slice(self, start: int, stop: int, direction: int, page_size: int | None = None):
        mapping = self._mapping
        for key in self._keys_slice(start, stop, direction):
            yield key, (mapping.tolerant(key) if isinstance(mapping, _ScanFiles) else mapping[key])
