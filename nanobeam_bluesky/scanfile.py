"""Experimental scan files: the HDF5 layout nanoprobes write, a reader, and a simulated example.

Layout (``format = "nanobeam-scan"``, version 1; every dataset path is configurable through
:class:`ScanLayout`, so files from a real beamline can be read as they are)::

    /entry                      NXentry; attrs: format, format_version, sample, start_time
      /data/data                detector frames, unsigned integer counts, either
                                (scan_y, scan_x, det_row, det_col) or (point, det_row, det_col);
                                chunked one frame per chunk; attrs: roi_center_px (optional)
      /data/x_um, /data/y_um    sample stage positions in micrometres, shaped like the scan
                                (scan_y, scan_x) or (point,)
      /instrument/nanobeam_instrument   (optional) the instrument as JSON text
      /sample/truth/{strain,omega_deg,chi_deg}   (simulated files only) the phantom maps

Frames are the *raw* detector (e.g. 256 x 256 pixels of 55 um) with the reflection somewhere on
it; the model takes the 128 x 128 ROI around the central reflected ray, binned 2 x 2 to
64 x 64 (:func:`nanobeam_bluesky.physics.bin_roi`). ``roi_center_px`` records where that ray
hits the detector (row, col, raw pixels) when the writer knows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._version import __version__
from .errors import NanobeamError
from .phantoms import Phantom
from .physics import Instrument, roi_origin, simulate_roi

__all__ = [
    "FORMAT",
    "ScanFileError",
    "ScanLayout",
    "ScanSummary",
    "inspect_scan_file",
    "simulate_scan_file",
    "write_scan_file",
]

FORMAT = "nanobeam-scan"
FORMAT_VERSION = 1


class ScanFileError(NanobeamError, ValueError):
    """A scan file that is missing, corrupt, truncated or not in the declared layout."""


@dataclass(frozen=True)
class ScanLayout:
    """Where a scan file keeps its frames and motor positions (HDF5 dataset paths).

    ``roi_center_attr`` names an attribute of the frames dataset holding (row, col) of the ROI
    centre in raw detector pixels; files without it need the centre from the server config.
    """

    frames: str = "/entry/data/data"
    x_um: str = "/entry/data/x_um"
    y_um: str = "/entry/data/y_um"
    roi_center_attr: str = "roi_center_px"
    instrument: str = "/entry/instrument/nanobeam_instrument"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ScanLayout:
        """Build from a config mapping; unknown keys are refused (typos must not pass silently)."""
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ScanFileError(
                f"unknown scan layout key(s) {sorted(unknown)}; known keys are {sorted(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class ScanSummary:
    """What a scan file holds, checked for consistency (no frame data is read)."""

    path: Path
    layout: ScanLayout
    frames_shape: tuple[int, ...]
    frames_dtype: np.dtype
    frames_chunks: tuple[int, ...] | None
    roi_center_px: tuple[float, float] | None
    instrument_json: str | None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def scan_shape(self) -> tuple[int, ...]:
        """(scan_y, scan_x) or (point,)."""
        return self.frames_shape[:-2]

    @property
    def detector_shape(self) -> tuple[int, int]:
        return self.frames_shape[-2], self.frames_shape[-1]

    @property
    def scan_dims(self) -> tuple[str, ...]:
        return ("scan_y", "scan_x") if len(self.scan_shape) == 2 else ("point",)


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def inspect_scan_file(
    path: str | Path,
    layout: ScanLayout = ScanLayout(),
    *,
    check: Callable[[h5py.File], None] | None = None,
) -> ScanSummary:
    """Open a scan file, check its layout and return a summary; clear errors otherwise.

    Raises :class:`ScanFileError` for a missing, unreadable, corrupt or truncated file, a missing
    dataset (naming the configured path, so a wrong layout is easy to fix), or positions whose
    shape does not match the scan. ``check`` is called with the open file before anything is
    read from it (the Tiled server refuses files that link to other files).
    """
    path = Path(path)
    if not path.is_file():
        raise ScanFileError(f"no scan file at {path}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ScanFileError(
            f"{path.name} is not a readable HDF5 file (corrupt or truncated: {exc}); "
            "copy it again from the beamline or rewrite it"
        ) from exc
    try:
        with h5:
            if check is not None:
                check(h5)
            frames = _dataset(h5, layout.frames, path, "frames")
            if frames.ndim not in (3, 4):
                raise ScanFileError(
                    f"{path.name}:{layout.frames} has shape {frames.shape}; expected detector "
                    "frames (scan_y, scan_x, det_row, det_col) or (point, det_row, det_col)"
                )
            if frames.dtype.kind not in "uif":
                raise ScanFileError(f"{path.name}:{layout.frames} has dtype {frames.dtype}; expected counts")
            scan_shape = frames.shape[:-2]
            for name in ("x_um", "y_um"):
                positions = _dataset(h5, getattr(layout, name), path, name)
                if positions.shape != scan_shape:
                    raise ScanFileError(
                        f"{path.name}:{getattr(layout, name)} has shape {positions.shape} but the "
                        f"frames imply a scan of shape {scan_shape}"
                    )
            center = frames.attrs.get(layout.roi_center_attr)
            roi_center = None
            if center is not None:
                center = np.asarray(center, dtype=float).ravel()
                if center.shape != (2,):
                    raise ScanFileError(f"{path.name}: attribute {layout.roi_center_attr} must be (row, col)")
                roi_center = (float(center[0]), float(center[1]))
            instrument_json = None
            if layout.instrument in h5:
                raw = h5[layout.instrument][()]
                instrument_json = raw.decode() if isinstance(raw, bytes) else str(raw)
            attrs = {}
            if "/entry" in h5:
                attrs = {k: _json_safe(v) for k, v in h5["/entry"].attrs.items()}
            return ScanSummary(
                path=path,
                layout=layout,
                frames_shape=tuple(frames.shape),
                frames_dtype=frames.dtype,
                frames_chunks=frames.chunks,
                roi_center_px=roi_center,
                instrument_json=instrument_json,
                attrs=attrs,
            )
    except ScanFileError:
        raise
    except (OSError, KeyError, RuntimeError) as exc:
        raise ScanFileError(f"{path.name} is corrupt or truncated ({exc})") from exc


def _dataset(h5: h5py.File, name: str, path: Path, what: str) -> h5py.Dataset:
    try:
        obj = h5[name]
    except KeyError as exc:
        raise ScanFileError(
            f"{path.name} has no {what} dataset at {name!r}; point the layout's {what!r} path "
            f"at the right dataset (server config / ScanLayout)"
        ) from exc
    if not isinstance(obj, h5py.Dataset):
        raise ScanFileError(f"{path.name}:{name} is a group, not the {what} dataset")
    return obj


def write_scan_file(
    path: str | Path,
    frames: np.ndarray | Iterator[np.ndarray],
    x_um: np.ndarray,
    y_um: np.ndarray,
    *,
    detector_shape: tuple[int, int] | None = None,
    dtype: str | np.dtype = "u4",
    roi_center_px: tuple[float, float] | None = None,
    sample: str = "",
    instrument: Instrument | None = None,
    truth: dict[str, np.ndarray] | None = None,
    layout: ScanLayout = ScanLayout(),
    compression: str | None = "gzip",
) -> Path:
    """Write a scan file in ``layout``; written under a temporary name, renamed when complete.

    Args:
        frames: counts (scan_y, scan_x, H, W) or (point, H, W), or an iterator of scan rows
            (scan_x, H, W) so that a large scan never sits in memory (then give
            ``detector_shape`` and the scan shape through ``x_um``).
        x_um, y_um: stage positions in micrometres, shaped like the scan.
        roi_center_px: (row, col) of the central reflected ray on the detector, raw pixels.
        truth: simulated files only: the phantom maps (strain, omega_deg, chi_deg).
    """
    path = Path(path)
    x_um = np.asarray(x_um, dtype=np.float64)
    y_um = np.asarray(y_um, dtype=np.float64)
    if x_um.shape != y_um.shape or x_um.ndim not in (1, 2):
        raise ScanFileError(
            f"x_um and y_um must share a (scan_y, scan_x) or (point,) shape, got {x_um.shape} "
            f"and {y_um.shape}"
        )
    if isinstance(frames, np.ndarray):
        if frames.shape[:-2] != x_um.shape:
            raise ScanFileError(
                f"frames of shape {frames.shape} do not match positions of shape {x_um.shape}"
            )
        detector_shape = frames.shape[-2:]
        rows: Iterator[np.ndarray] = iter(frames) if x_um.ndim == 2 else iter([frames])
    else:
        if detector_shape is None:
            raise ScanFileError("give detector_shape when frames come as an iterator of rows")
        rows = frames
    shape = (*x_um.shape, *detector_shape)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(partial, "w") as h5:
            entry = h5.require_group("/entry")
            entry.attrs.update(
                NX_class="NXentry",
                format=FORMAT,
                format_version=FORMAT_VERSION,
                sample=sample,
                start_time=datetime.now(UTC).isoformat(),
                writer=f"nanobeam_bluesky {__version__}",
            )
            data = h5.create_dataset(
                layout.frames,
                shape=shape,
                dtype=dtype,
                chunks=(*([1] * (len(shape) - 2)), *detector_shape),
                compression=compression,
                shuffle=compression is not None,
            )
            data.attrs["units"] = "counts"
            if roi_center_px is not None:
                data.attrs[layout.roi_center_attr] = np.asarray(roi_center_px, dtype=float)
            h5.create_dataset(layout.x_um, data=x_um).attrs["units"] = "um"
            h5.create_dataset(layout.y_um, data=y_um).attrs["units"] = "um"
            if instrument is not None:
                h5.create_dataset(layout.instrument, data=instrument.to_json())
            for name, values in (truth or {}).items():
                h5.create_dataset(f"/entry/sample/truth/{name}", data=np.asarray(values))
            written = 0
            n_rows = shape[0] if x_um.ndim == 2 else 1
            for i, row in enumerate(rows):
                if i >= n_rows:
                    raise ScanFileError(f"more frame rows than the {n_rows} the positions imply")
                row = np.asarray(row)
                if x_um.ndim == 2:
                    data[i] = row
                else:
                    data[...] = row
                written += 1
            if written != n_rows:
                raise ScanFileError(f"got {written} frame rows, the positions imply {n_rows}")
            entry.attrs["complete"] = True
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return path


def simulate_scan_file(
    path: str | Path,
    phantom: Phantom,
    *,
    instrument: Instrument = Instrument(),
    max_counts: float = 7.0,
    scale: float = 1.0,
    detector_shape: tuple[int, int] = (256, 256),
    roi_center_px: tuple[float, float] = (128.0, 128.0),
    rng: np.random.Generator | int | None = None,
    sample: str = "simulated",
    layout: ScanLayout = ScanLayout(),
    upsample: int | None = None,
) -> Path:
    """Simulate a raster scan over a phantom and write it as a scan file.

    Each point's 128 x 128 raw ROI (:func:`simulate_roi`, mean intensity per raw pixel) is placed
    on a ``detector_shape`` detector around ``roi_center_px`` and drawn as Poisson counts with
    expectation ``max_counts * raw / (scale * binning**2)``, so that the 2 x 2 *sum* of the
    ROI has the 64 x 64 convention of the library (``max_counts`` at intensity ``scale``).

    Args:
        phantom: the sample; one scan point per map pixel, at the phantom's stage positions (µm).
        scale: intensity that maps to ``max_counts`` in a binned pixel (1 = Laue maximum).
    """
    strain, omega_deg, chi_deg = phantom.strain, phantom.omega_deg, phantom.chi_deg
    roi, binning = instrument.roi_pixels, instrument.binning
    height, width = detector_shape
    try:
        row0, col0 = roi_origin(roi_center_px, roi, detector_shape)
    except ValueError as exc:
        raise ScanFileError(f"{exc} (roi_center_px / detector_shape)") from None
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    ny, nx = strain.shape
    y_um, x_um = np.meshgrid(phantom.y_um, phantom.x_um, indexing="ij")

    def rows() -> Iterator[np.ndarray]:
        for j in range(ny):
            raw = simulate_roi(strain[j], omega_deg[j], chi_deg[j], instrument, upsample=upsample)
            raw = _to_detector_orientation(raw, instrument)
            expected = raw.astype(np.float64) * (max_counts / (scale * binning**2))
            frames = np.zeros((nx, height, width), dtype=np.uint32)
            frames[:, row0 : row0 + roi, col0 : col0 + roi] = rng.poisson(expected)
            yield frames

    return write_scan_file(
        path,
        rows(),
        x_um,
        y_um,
        detector_shape=detector_shape,
        roi_center_px=roi_center_px,
        sample=sample,
        instrument=instrument,
        truth={"strain": strain, "omega_deg": omega_deg, "chi_deg": chi_deg},
        layout=layout,
    )


def _to_detector_orientation(frames: np.ndarray, instrument: Instrument) -> np.ndarray:
    """Inverse of :func:`nanobeam_bluesky.physics.orient`: physics.md frame -> physical detector."""
    if instrument.detector_flip_cols:
        frames = frames[..., :, ::-1]
    if instrument.detector_flip_rows:
        frames = frames[..., ::-1, :]
    if instrument.detector_transpose:
        frames = np.swapaxes(frames, -1, -2)
    return np.ascontiguousarray(frames)
