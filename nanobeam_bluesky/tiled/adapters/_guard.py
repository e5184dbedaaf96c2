"""What ``nanobeam serve`` refuses: bytes from outside its declared files and directories.

Three checks, each logged (logger ``nanobeam_bluesky.serve``) and answered with a one-line 403
(a :class:`~nanobeam_bluesky.tiled.RefusedError`; see ``nanobeam_bluesky.tiled._http``):

- :func:`open_hdf5`: every HDF5 file an adapter opens is refused while it holds an external link,
  a virtual dataset or a dataset with external raw storage (each can read another file). Soft
  links stay inside the file and are fine. A file's verdict is kept until it changes on disk.
- :func:`contained_path`: a file a served node reads besides its own (a TIFF frame, a positions
  file next to them) is resolved (symlinks, ``..``) and refused outside the served directory.
- :func:`contained_catalog`: a tiled catalog whose adapters (ours and tiled's own, for every MIME
  type) first resolve each asset (symlinks, ``..``) and refuse it outside the declared storage.
  Tiled checks the asset *path* only, so ``<readable>/../x`` or a symlink would pass there.
- :func:`named_instrument`: an ``instrument`` parameter is a name looked up in a configured
  directory (or "default"), never a path; an unknown or invalid name says nothing about files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import h5py

from ...physics import Instrument, InstrumentError
from .._errors import RefusedError
from .._http import served_errors

if TYPE_CHECKING:
    from tiled.catalog.orm import Node
    from tiled.structures.data_source import DataSource

__all__ = [
    "check_hdf5",
    "contained_catalog",
    "contained_path",
    "hdf5_refusal",
    "named_instrument",
    "open_hdf5",
]

log = logging.getLogger("nanobeam_bluesky.serve")

_SERVE_INSIDE = "nanobeam serve serves only data stored inside its declared files"
#: MIME types read with h5py by tiled's own adapters (ours check every file they open).
_HDF5_MIMETYPE_WORDS = ("hdf5", "netcdf")
#: Instrument config names: no path separators, no leading dot (so never ".."), no NUL.
_NAME = re.compile(r"[^/\\\x00.][^/\\\x00]{0,254}")
_INSTRUMENT_SUFFIXES = (".yaml", ".yml", ".json")


def _refused(message: str, detail: str) -> RefusedError:
    """Log the refusal with its detail (server side only) and return the client's error."""
    log.warning("%s [%s]", message, detail)
    return RefusedError(message)


# ---------------------------------------------------------------------------------- HDF5
#: Verdicts by (device, inode, size, mtime, ctime) of the open file: (message, detail) or None.
#: ctime cannot be set by users, so a rewritten file is checked again.
_VERDICTS: dict[tuple[int, ...], tuple[str, str] | None] = {}
_MAX_VERDICTS = 4096
_UNCHECKED = ("", "")


def hdf5_refusal(h5: h5py.File) -> tuple[str, str] | None:
    """The first object of ``h5`` that reads from another file: (problem, detail), else None.

    Visits every link without following it (``visititems_links``), so nothing outside the file
    is opened: external links, virtual datasets (whose sources may be other files) and datasets
    with external raw storage are reported; soft links resolve inside the file.
    """

    def visit(name: str, link: Any) -> tuple[str, str] | None:
        if isinstance(link, h5py.SoftLink):
            return None
        if isinstance(link, h5py.ExternalLink):
            return f"/{name} is an HDF5 external link", f"to {link.filename}:{link.path}"
        if not isinstance(link, h5py.HardLink):
            return f"/{name} is an HDF5 link of an unsupported type", repr(link)
        obj = h5.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                sources = sorted({s.file_name for s in obj.virtual_sources()})
                return f"/{name} is an HDF5 virtual dataset", f"sources in {sources}"
            if obj.external:
                return f"/{name} keeps its data in external raw files", f"{obj.external}"
        return None

    return h5.visititems_links(visit)


def _file_key(h5: h5py.File) -> tuple[int, ...] | None:
    try:  # the descriptor HDF5 reads from: the key describes exactly the file that was checked
        st = os.fstat(h5.id.get_vfd_handle())
    except (OSError, TypeError, ValueError, RuntimeError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_hdf5(h5: h5py.File, label: str) -> None:
    """Raise :class:`RefusedError` if ``h5`` holds anything that reads another file."""
    key = _file_key(h5)
    verdict = _VERDICTS.get(key, _UNCHECKED) if key is not None else _UNCHECKED
    if verdict is _UNCHECKED:
        verdict = hdf5_refusal(h5)
        if key is not None:
            if len(_VERDICTS) >= _MAX_VERDICTS:
                _VERDICTS.clear()
            _VERDICTS[key] = verdict
    if verdict is not None:
        problem, detail = verdict
        raise _refused(
            f"{label}: refused: {problem}; {_SERVE_INSIDE}: copy the data into the file to serve it",
            f"{h5.filename}: {detail}",
        )


def open_hdf5(path: str | Path, label: str | None = None, **kwargs: Any) -> h5py.File:
    """Open an HDF5 file read-only and check it (:func:`check_hdf5`); use as a context manager."""
    h5 = h5py.File(path, "r", **kwargs)
    try:
        check_hdf5(h5, label or Path(path).name)
    except BaseException:
        h5.close()
        raise
    return h5


# ---------------------------------------------------------------------------------- directories
def contained_path(path: Path, root: Path, label: str) -> Path:
    """``path`` resolved (symlinks, ``..``); :class:`RefusedError` when it leads outside ``root``
    (a resolved directory), naming the node ``label`` and the file, never the target."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise _refused(
            f"{label}: refused: {path.name} resolves outside the server's declared directories "
            "(through a symlink or '..'); copy the file into the directory to serve it",
            f"{path} -> {resolved}",
        )
    return resolved


# ---------------------------------------------------------------------------------- instruments
def named_instrument(
    value: Instrument | dict[str, Any] | str | None, instrument_dir: str | Path | None = None
) -> Instrument:
    """An instrument from an object, an inline config (dict), or a name; never from a path.

    A name ("beamline" or "beamline.yaml") is looked up in ``instrument_dir`` (YAML/JSON files;
    a symlink leading out of it is not followed); "default" and None give physics.md's
    instrument. An unknown or invalid name gets one message, which tells nothing about files:
    the reason is logged on the server.
    """
    if value is None:
        return Instrument()
    if isinstance(value, Instrument):
        return value
    if isinstance(value, dict):
        return Instrument.from_dict(value)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InstrumentError(
            "an instrument is given by name (a config in the server's instrument directory), "
            "as an inline config, or as 'default'; never as a path"
        )
    if value == "default":
        return Instrument()
    unknown = InstrumentError(
        f"no valid instrument config named {value!r} in the server's instrument directory; "
        "use a name the server offers, an inline config, or 'default'"
    )
    if instrument_dir is None:
        log.warning("instrument %r asked for, but no instrument directory is configured", value)
        raise unknown
    directory = Path(instrument_dir).expanduser().resolve()
    names = [value] if value.endswith(_INSTRUMENT_SUFFIXES) else [value + s for s in _INSTRUMENT_SUFFIXES]
    for name in names:
        path = (directory / name).resolve()
        if not path.is_file():
            continue
        if not path.is_relative_to(directory):
            log.warning("instrument %r: %s leads out of %s; refused", value, name, directory)
            raise unknown
        try:
            return Instrument.load(path)
        except (InstrumentError, TypeError, ValueError) as exc:
            log.warning("instrument %r: %s is not a valid instrument config: %s", value, path, exc)
            raise unknown from None
    log.warning("instrument %r: no such config in %s", value, directory)
    raise unknown


# ---------------------------------------------------------------------------------- catalogs
@dataclass(frozen=True)
class _Storage:
    """The directories one catalog may read (resolved) and its instrument directory."""

    roots: tuple[Path, ...]
    instrument_dir: Path | None

    @classmethod
    def from_config(cls, items: Iterable[Any], instrument_dir: str | Path | None) -> _Storage:
        from tiled.utils import path_from_uri

        roots = []
        for item in items:
            text = str(item)
            if "://" not in text:
                roots.append(Path(text).expanduser().resolve())
            elif urlparse(text).scheme == "file":
                roots.append(Path(path_from_uri(text)).resolve())
        return cls(tuple(roots), Path(instrument_dir).expanduser().resolve() if instrument_dir else None)

    def check(self, uri: str, label: str, hdf5: bool, h5_kwargs: dict[str, Any]) -> None:
        """Refuse an asset outside the declared storage (after resolving it); check HDF5 files."""
        from tiled.storage import get_storage
        from tiled.utils import path_from_uri

        if urlparse(uri).scheme != "file":
            try:  # a database or object store: only those the server declares
                get_storage(uri)
            except Exception:
                raise _refused(
                    f"{label or 'asset'}: refused: the asset is not in a storage this server "
                    "declares; register files from the declared directories",
                    uri,
                ) from None
            return
        path = Path(path_from_uri(uri))
        resolved = path.resolve()  # follows symlinks and removes '..'
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise _refused(
                f"{label or path.name}: refused: {path.name} resolves outside the server's declared "
                "directories (through a symlink or '..'); copy the file into a declared directory to "
                "serve it",
                f"{uri} -> {resolved}",
            )
        if hdf5 and resolved.is_file():
            with open_hdf5(resolved, path.name, **h5_kwargs):
                pass


def _contained(adapter: type, mimetype: str, storage: _Storage) -> type:
    """``adapter`` whose constructors first check every asset (:meth:`_Storage.check`)."""
    hdf5 = any(word in mimetype for word in _HDF5_MIMETYPE_WORDS)

    def check(uris: Iterable[str | None], label: str, parameters: dict[str, Any]) -> None:
        h5_kwargs = {k: parameters[k] for k in ("swmr", "locking") if parameters.get(k) is not None}
        with served_errors(label):
            for uri in uris:
                if uri is not None:
                    storage.check(uri, label, hdf5, h5_kwargs)

    def from_catalog(cls: type[Any], data_source: DataSource[Any], node: Node, /, **parameters: Any) -> Any:
        uris = [asset.data_uri for asset in data_source.assets or ()]
        check([*uris, *(parameters.get("data_uris") or ())], str(getattr(node, "key", "") or ""), parameters)
        return super(contained, cls).from_catalog(data_source, node, **parameters)

    def from_uris(cls: type[Any], *uris: str, **parameters: Any) -> Any:
        check(uris, "", parameters)
        return super(contained, cls).from_uris(*uris, **parameters)

    namespace: dict[str, Any] = {
        "__module__": adapter.__module__,
        "__doc__": adapter.__doc__,
        "from_catalog": classmethod(from_catalog),
        # Read by our adapters for an `instrument` name; a class attribute, so no client can set it.
        "instrument_dir": storage.instrument_dir,
    }
    if hasattr(adapter, "from_uris"):
        namespace["from_uris"] = classmethod(from_uris)
    # type[Any], not type: super() wants a class object, and the class is only known at run time
    contained: type[Any] = type(adapter.__name__, (adapter,), namespace)
    return contained


class _ContainedAdapters(Mapping[str, type]):
    """Adapters by MIME type, each checking its assets: the configured ones and, looked up on
    first use (so nothing is imported up front), tiled's defaults for every other type."""

    def __init__(self, configured: Mapping[str, Any], storage: _Storage) -> None:
        self._configured = dict(configured)
        self._storage = storage
        self._made: dict[str, type] = {}

    def __getitem__(self, mimetype: str) -> type:
        if mimetype not in self._made:
            from tiled.mimetypes import DEFAULT_ADAPTERS_BY_MIMETYPE
            from tiled.utils import import_object

            adapter = self._configured.get(mimetype) or DEFAULT_ADAPTERS_BY_MIMETYPE[mimetype]
            if isinstance(adapter, str):
                adapter = import_object(adapter)
            self._made[mimetype] = _contained(adapter, mimetype, self._storage)
        return self._made[mimetype]

    # Only the configured types are listed: tiled imports what it lists at start-up.
    def __iter__(self) -> Iterator[str]:
        return iter(self._configured)

    def __len__(self) -> int:
        return len(self._configured)

    def __bool__(self) -> bool:  # tiled replaces an empty (falsy) mapping by its unchecked defaults
        return True


def contained_catalog(
    uri: str,
    *,
    readable_storage: list[str] | None = None,
    writable_storage: list[str] | dict[str, str] | str | None = None,
    adapters_by_mimetype: Mapping[str, Any] | None = None,
    instrument_dir: str | None = None,
    **kwargs: Any,
) -> Any:
    """tiled's catalog (``tiled.catalog.from_uri``, same arguments) that serves only assets that
    resolve inside its readable or writable storage, for every MIME type.

    ``instrument_dir``: where ``instrument`` names given by catalog entries are looked up.
    """
    from tiled.catalog import from_uri

    from . import _streaming  # noqa: F401  registers the namespaced Redis stream store (cache_config)

    if isinstance(writable_storage, dict):  # tiled's older form: {name: uri}
        writable = list(writable_storage.values())
    elif isinstance(writable_storage, str):
        writable = [writable_storage]
    else:
        writable = list(writable_storage or [])
    storage = _Storage.from_config([*(readable_storage or []), *writable], instrument_dir)
    return from_uri(
        uri,
        readable_storage=readable_storage,
        writable_storage=writable_storage,
        adapters_by_mimetype=_ContainedAdapters(adapters_by_mimetype or {}, storage),
        **kwargs,
    )
