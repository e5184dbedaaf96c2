"""The derived run: (strain, omega, chi) rows composed with event-model's compose API."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import numpy as np
from event_model import DocumentNames, compose_run, schema_validators
from event_model.documents import EventPage

from .._schema import PARAMETERS, derived_data_key
from .._version import __version__
from ..inference import Predictor
from ..quality import FLAG_BITS
from ._frames import FrameLayout
from ._rows import RowBlock

__all__ = [
    "ANALYSIS_STAGE",
    "DERIVED_FIELDS",
    "RAW_STAGE",
    "THICKNESS_FIELDS",
    "DerivedRun",
    "is_derived_start",
    "mark_raw_runs",
]

#: The ``analysis_stage`` of every derived run's start document ...
ANALYSIS_STAGE = "nanobeam_nn"
#: ... and of raw runs (set by :func:`mark_raw_runs`): one key picks either kind in a query,
#: e.g. ``Key("start.analysis_stage") == "raw"`` in Tiled, ``db(analysis_stage="raw")``.
RAW_STAGE = "raw"
#: The derived run's ``scan_id``: the schema's default, which no RunEngine scan has (they count
#: from 1), so ``catalog[N]``, ``db[N]`` and ``ScanID(N)`` only ever find the scan itself. The
#: scan's number is the derived run's ``parent_scan_id``.
DERIVED_SCAN_ID = 0
#: The derived run's ``detectors`` and descriptor object name.
DERIVED_OBJECT = "nanobeam"
#: Data keys of the derived stream besides the raw seq_num and the positions.
DERIVED_FIELDS = (
    *PARAMETERS,
    *(f"{p}_std" for p in PARAMETERS),
    *(f"{p}_err" for p in PARAMETERS),
    "fit_quality",
    "flag",
)
#: ... and of a model that predicts the film thickness (Å).
THICKNESS_FIELDS = ("thickness", "thickness_std", "thickness_err")
#: Raw start keys copied into the derived start when present (maps, shape, sample...). Not
#: ``scan_id`` (see DERIVED_SCAN_ID), nor ``hints`` (their dimensions are the derived stream's).
COPIED_START_KEYS = (
    "sample",
    "shape",
    "extents",
    "snaking",
    "motors",
    "num_points",
    "proposal",
    "beamline_id",
    "data_session",
    "owner",
    "group",
    "project",
)


def is_derived_start(start: Mapping[str, Any]) -> bool:
    """True for the start document of a run this package derived (never analyse those again)."""
    return "parent_uid" in start and isinstance(start.get("nanobeam"), Mapping)


def mark_raw_runs(RE: Any) -> None:
    """Label the RunEngine's runs as raw: ``analysis_stage: "raw"`` in every start document.

    With it, one query picks raw or derived runs from a catalog that holds both
    (``Key("start.analysis_stage") == "raw"``, or ``== "nanobeam_nn"`` for the analyses). A
    value the plan or ``RE.md`` already sets is kept.
    """
    RE.md.setdefault("analysis_stage", RAW_STAGE)


def _derived_dimensions(raw_start: Mapping[str, Any], stream: str, keys: Sequence[str]) -> list[Any]:
    """The raw run's ``hints.dimensions`` of the frame stream, restricted to the positions the
    derived stream carries (renamed to its stream, "primary"); else the raw seq_num."""
    dimensions = []
    for dim in (raw_start.get("hints") or {}).get("dimensions") or []:
        try:
            fields, dim_stream = dim
        except (TypeError, ValueError):
            continue
        fields = [fields] if isinstance(fields, str) else list(fields)
        if dim_stream == stream and fields and all(f in keys for f in fields):
            dimensions.append([fields, "primary"])
    if not dimensions:
        dimensions = [[[k], "primary"] for k in keys] or [[["raw_seq_num"], "primary"]]
    return dimensions


class DerivedRun:
    """Composes the documents of one derived run from model results.

    The start links to the raw run (``parent_uid``) and names the model; the single stream
    (``primary``) has one row per raw frame: strain, omega, chi (deg), their ``_std`` and ``_err``, the
    quality ``flag``, the raw ``raw_seq_num`` and the raw positions; and ``thickness`` (Å) with its
    ``_std`` and ``_err`` for a model that predicts the film.
    """

    def __init__(
        self,
        raw_start: Mapping[str, Any],
        raw_descriptor: Mapping[str, Any],
        predictor: Predictor,
        layout: FrameLayout,
        position_keys: Sequence[str],
        *,
        analysis_stage: str = ANALYSIS_STAGE,
        validate_pages: bool = False,
    ) -> None:
        self.validate_pages = validate_pages
        self.raw_stream = raw_descriptor.get("name", "primary")
        self.position_keys = list(position_keys)
        metadata: dict[str, Any] = {k: raw_start[k] for k in COPIED_START_KEYS if k in raw_start}
        metadata.update(
            parent_uid=raw_start["uid"],
            scan_id=DERIVED_SCAN_ID,
            analysis_stage=analysis_stage,
            plan_type="analysis",
            plan_name="nanobeam_live_analysis",
            detectors=[DERIVED_OBJECT],
            # The raw hints (e.g. "gridding", for BestEffortCallback's LiveGrid), with the
            # dimensions the derived stream carries.
            hints={
                **(raw_start.get("hints") or {}),
                "dimensions": _derived_dimensions(raw_start, self.raw_stream, self.position_keys),
            },
            parent_plan_name=raw_start.get("plan_name", ""),
            **({"parent_scan_id": raw_start["scan_id"]} if "scan_id" in raw_start else {}),
            nanobeam={
                "model_id": predictor.model_id,
                "model_sha256": predictor.sha256,
                "n_members": predictor.n_members,
                "n_refiners": predictor.n_refiners,
                "instrument": predictor.instrument.to_dict(),
                "image_key": layout.image_key,
                "frame_shape": list(layout.frame_shape),
                "raw_stream": self.raw_stream,
                "package_version": __version__,
                "flags": {name: int(f) for name, f in FLAG_BITS.items()},
            },
        )
        self.bundle = compose_run(metadata=metadata)
        self.start_doc = self.bundle.start_doc
        source = f"nanobeam:{predictor.model_id}:{predictor.sha256[:12]}"
        self.fields = (*DERIVED_FIELDS, *(THICKNESS_FIELDS if predictor.card.predicts_thickness else ()))
        data_keys: dict[str, Any] = {name: derived_data_key(name, source) for name in self.fields}
        data_keys["raw_seq_num"] = {
            "source": f"raw:{self.raw_stream}",
            "dtype": "integer",
            "dtype_numpy": "<i8",
            "shape": [],
            "units": None,
        }
        raw_keys = raw_descriptor["data_keys"]
        for key in self.position_keys:
            raw = raw_keys[key]
            data_keys[key] = {
                "source": raw.get("source", f"raw:{key}"),
                "dtype": "number",
                "dtype_numpy": "<f8",
                "shape": [],
                "units": raw.get("units"),
            }
        self.data_keys = data_keys
        self.descriptor_bundle = self.bundle.compose_descriptor(
            name="primary",
            data_keys=data_keys,
            object_keys={
                DERIVED_OBJECT: [*self.fields, "raw_seq_num"],
                **{k: [k] for k in self.position_keys},
            },
            # Positions are dimensions (start hints), not data columns: hinted with no fields.
            hints={
                DERIVED_OBJECT: {"fields": list(PARAMETERS)},
                **{k: {"fields": []} for k in self.position_keys},
            },
        )
        self.descriptor_doc = self.descriptor_bundle.descriptor_doc
        self.rows = 0

    def event_page(
        self,
        blocks: Sequence[RowBlock],
        mean: np.ndarray,
        std: np.ndarray,
        flags: np.ndarray,
        err: np.ndarray | None = None,
        fit_quality: np.ndarray | None = None,
        film: np.ndarray | None = None,
    ) -> EventPage:
        """One EventPage for consecutive blocks; mean/std/err (n, 3), flags and fit_quality (n,)
        cover all their rows; ``film`` (n, 3): thickness, its std and err (Å), for a run whose
        model predicts it (NaN rows where not given)."""
        err = np.full_like(mean, np.nan) if err is None else err
        fit_quality = np.full(len(mean), np.nan) if fit_quality is None else fit_quality
        seq = np.concatenate([b.seq_nums for b in blocks])
        times = np.concatenate([b.times for b in blocks])
        n = len(seq)
        # numpy arrays of each key's declared dtype_numpy: TiledWriter stores what it is given
        # (Python ints became int64 under a uint16 flag).
        data: dict[str, np.ndarray] = {}
        for i, name in enumerate(PARAMETERS):
            data[name] = mean[:, i].astype(np.float64)
            data[f"{name}_std"] = std[:, i].astype(np.float64)
            data[f"{name}_err"] = err[:, i].astype(np.float64)
        data["fit_quality"] = np.asarray(fit_quality, dtype=np.float64)
        if THICKNESS_FIELDS[0] in self.fields:
            film = np.full((len(mean), 3), np.nan) if film is None else film
            for i, name in enumerate(THICKNESS_FIELDS):
                data[name] = film[:, i].astype(np.float64)
        data["flag"] = flags.astype(self.data_keys["flag"]["dtype_numpy"])
        data["raw_seq_num"] = seq.astype(np.int64)
        for key in self.position_keys:
            values = [b.positions.get(key, np.full(len(b), np.nan)) for b in blocks]
            data[key] = np.concatenate(values).astype(np.float64)
        # Positions were read with their frame; the results are this moment's.
        now = time.time()
        timestamps = {key: times if key in self.position_keys else np.full(n, now) for key in data}
        # jsonschema costs ~0.2 ms per row: validate the first page of a run (and every page if
        # asked); the rest are built by the same code.
        validate = self.validate_pages or self.rows == 0
        self.rows += n
        return self.descriptor_bundle.compose_event_page(
            # numpy arrays are valid event-model arrays (its validator accepts them); its type
            # hints say list.
            data=cast(Any, data),
            timestamps=cast(Any, timestamps),
            time=cast(Any, times),
            validate=validate,
        )

    def stop(
        self,
        exit_status: Literal["success", "abort", "fail"],
        reason: str,
        pooled: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The stop document; ``pooled``: the run's pooled physics check (kept under "nanobeam")."""
        # A plain dict: the schema allows our own "nanobeam" key, event-model's RunStop type does not.
        stop: dict[str, Any] = {
            **self.bundle.compose_stop(exit_status=exit_status, reason=reason, validate=False)
        }
        if pooled:
            stop["nanobeam"] = dict(pooled)
        schema_validators[DocumentNames.stop].validate(stop)
        return stop
