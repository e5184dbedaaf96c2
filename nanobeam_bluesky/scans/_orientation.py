"""Which way is the detector mounted? The eight orientations of a square detector, tried on a scan.

A detector may be mounted rotated or mirrored relative to physics.md's frame (columns along 2θ,
rows out of the scattering plane); the instrument says how with ``detector_transpose``,
``detector_flip_rows`` and ``detector_flip_cols`` (applied in that order). A wrong description
is not always visible in the maps, so :func:`check_orientation` reads a scan's raw ROIs with each
of the eight descriptions, runs the physics check on each, and compares how well the forward model
describes the frames (``fit_quality``, the Poisson deviance z-score).

What the frames can and cannot tell (docs/physics.md, "Detector orientation guide"):

* **transpose**: always. A transposed frame has its Laue band along rows, which no (ε, ω, χ)
  makes: the median ``fit_quality`` is 78 at the seed's 7 counts, 575 at 50.
* **flip rows**: never. The geometry is mirror-symmetric out of the scattering plane: a frame
  with its rows flipped is exactly the frame with χ of the other sign.
* **flip cols**: hardly. A frame with its columns flipped is the frame with ω of the other sign
  and ε of (nearly) the other sign, but for the small slant that χ gives the band (0.05 binned
  pixels across the ring at χ = 0.1°), which flipping columns turns the wrong way. Telling the
  two apart takes thousands of frames at the seed's counts.

Where the frames cannot decide, the report says so and what would decide: a known tilt of the
sample and the sign of the change it makes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._schema import FLAG_DTYPE, NO_VALUE, Flag
from ..errors import InputError
from ..inference import Predictor
from ..physics import ORIENTATION_FIELDS, FrameModel, Instrument

__all__ = [
    "ORIENTATIONS",
    "Orientation",
    "OrientationReport",
    "OrientationScore",
    "check_orientation",
    "orientation_named",
    "relative_orientation",
    "save_orientation_figure",
]

#: Standard errors by which an orientation's frames must fit worse than the best one's for the
#: frames to reject it (one-sided; about 1 in 740 for an orientation that fits as well).
SIGNIFICANCE = 3.0
#: Flags whose share of frames the report gives: those a wrong orientation causes (not the
#: detector's own: saturated, hot or non-integer pixels; not the pooled test, which marks every
#: frame at once).
ORIENTATION_FLAGS = Flag.NO_RING | Flag.POOR_FIT | Flag.THICKNESS | Flag.OUT_OF_RANGE


@dataclass(frozen=True)
class Orientation:
    """One way of mapping the detector's image onto physics.md's frame: transpose, then flip
    rows, then flip columns (the order ``physics.orient`` applies them)."""

    name: str
    transpose: bool
    flip_rows: bool
    flip_cols: bool

    @property
    def fields(self) -> dict[str, bool]:
        """The instrument's three orientation keys and their values."""
        return dict(zip(ORIENTATION_FIELDS, (self.transpose, self.flip_rows, self.flip_cols), strict=True))

    def yaml(self, indent: str = "") -> str:
        """The three instrument YAML lines, e.g. ``detector_transpose: false``."""
        return "\n".join(f"{indent}{key}: {str(value).lower()}" for key, value in self.fields.items())

    def apply(self, instrument: Instrument) -> Instrument:
        """``instrument`` described as mounted this way (everything else unchanged)."""
        return dataclasses.replace(
            instrument,
            detector_transpose=self.transpose,
            detector_flip_rows=self.flip_rows,
            detector_flip_cols=self.flip_cols,
        )

    def to_frame(self, images: np.ndarray) -> np.ndarray:
        """Images (..., H, W) as the detector gives them -> physics.md's frame (``physics.orient``)."""
        if self.transpose:
            images = np.swapaxes(images, -1, -2)
        if self.flip_rows:
            images = images[..., ::-1, :]
        if self.flip_cols:
            images = images[..., :, ::-1]
        return images

    def from_frame(self, frames: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_frame`: what a detector mounted this way records of frames
        (..., H, W) in physics.md's frame."""
        if self.flip_cols:
            frames = frames[..., :, ::-1]
        if self.flip_rows:
            frames = frames[..., ::-1, :]
        if self.transpose:
            frames = np.swapaxes(frames, -1, -2)
        return frames


def _orientations() -> tuple[Orientation, ...]:
    flips = {
        (False, False): "",
        (True, False): "flip rows",
        (False, True): "flip cols",
        (True, True): "flip rows + cols",
    }
    return tuple(
        Orientation(
            " + ".join(part for part in ("transpose" * transpose, flip) if part) or "as is",
            transpose,
            flip_rows,
            flip_cols,
        )
        for transpose in (False, True)
        for (flip_rows, flip_cols), flip in flips.items()
    )


#: The eight orientations of a square detector: "as is", "flip rows", "flip cols",
#: "flip rows + cols" (a half turn), "transpose", "transpose + flip rows" (a quarter turn: the
#: detector's image turned 90° anticlockwise, row 0 at the top), "transpose + flip cols" (90°
#: clockwise) and "transpose + flip rows + cols" (the mirror in the anti-diagonal).
ORIENTATIONS: tuple[Orientation, ...] = _orientations()


def orientation_named(name: str) -> Orientation:
    """The orientation called ``name`` (one of :data:`ORIENTATIONS`' names)."""
    for orientation in ORIENTATIONS:
        if orientation.name == name:
            return orientation
    raise InputError(f"no orientation {name!r}; the orientations are {[o.name for o in ORIENTATIONS]}")


def _of_instrument(instrument: Instrument) -> Orientation:
    key = (instrument.detector_transpose, instrument.detector_flip_rows, instrument.detector_flip_cols)
    return next(o for o in ORIENTATIONS if (o.transpose, o.flip_rows, o.flip_cols) == key)


def relative_orientation(a: Orientation, b: Orientation) -> Orientation:
    """The operation on physics.md's frames that turns a scan read with ``a`` into the same scan
    read with ``b`` (``b.to_frame(x) == g.to_frame(a.to_frame(x))`` for the returned ``g``)."""
    probe = np.arange(12.0).reshape(3, 4)  # not square: a transpose shows in the shape
    seen = b.to_frame(a.from_frame(probe))
    return next(
        g for g in ORIENTATIONS if g.to_frame(probe).shape == seen.shape and (g.to_frame(probe) == seen).all()
    )


#: What each operation on physics.md's frames does to the parameters, and what tells the two
#: readings apart: {name of the relative orientation: (what it does, what decides)}.
_RELATIONS: dict[str, tuple[str, str]] = {
    "flip rows": (
        "χ → −χ (exactly: the geometry is mirror-symmetric out of the scattering plane)",
        "tilt χ by a known +Δχ (the normal towards +x): the fitted χ must rise by Δχ",
    ),
    "flip cols": (
        "ω → −ω and ε → about −ε (the band's 2θ offset mirrored; only the 0.05-pixel slant χ "
        "gives the band differs)",
        "rock ω by a known +Δω (raising the incidence angle): the fitted ω must rise by Δω",
    ),
    "flip rows + cols": (
        "ε, ω and χ → about their negatives (the mirrors in rows and in columns together)",
        "rock ω and tilt χ by known +Δω and +Δχ: the fitted ω and χ must rise by them",
    ),
}
#: Readings that differ by a transpose and that the frames still could not tell apart.
_TRANSPOSED = (
    "the Laue band along the other axis",
    "too few counts or frames to tell: use more of the scan",
)


def _relation(a: Orientation, b: Orientation) -> tuple[str, str]:
    g = relative_orientation(a, b)
    return _RELATIONS.get(g.name, _TRANSPOSED)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class OrientationScore:
    """How well the physics describes a scan's frames read with one orientation.

    Attributes:
        orientation: the orientation tried.
        median_fit_quality: median of the frames' ``fit_quality`` (deviance z-score: about 0 where
            the forward model describes the frames; hundreds for a wrong transpose). NaN if no
            frame had enough counts.
        flagged_fraction: share of the frames flagged NO_RING, POOR_FIT, THICKNESS or
            OUT_OF_RANGE (:data:`ORIENTATION_FLAGS`).
        flag_counts: frames with each of those flags, by flag name.
        excess: mean over the frames of ``fit_quality`` minus the best orientation's, frame by
            frame (0 for the best).
        excess_z: ``excess`` in standard errors of that mean (Vuong's test of two models on the
            same frames); below ``significance``: as good as the best within noise.
        fit_quality: (n,) per frame (NaN where a frame had too few counts).
        summed_frame: (F, F) the frames read this way, binned and summed (counts; masked pixels 0).
        summed_model: (F, F) the forward model at each frame's fitted (ε, ω, χ), count scale and
            background, summed over the frames that got a value (counts; masked pixels 0).
        modelled_frames: frames in ``summed_model``.
    """

    orientation: Orientation
    median_fit_quality: float
    flagged_fraction: float
    flag_counts: dict[str, int]
    excess: float
    excess_z: float
    fit_quality: np.ndarray
    summed_frame: np.ndarray
    summed_model: np.ndarray
    modelled_frames: int


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class OrientationReport:
    """What :func:`check_orientation` found.

    Attributes:
        rows: one :class:`OrientationScore` per orientation, in :data:`ORIENTATIONS`' order.
        best: the orientation with the lowest median ``fit_quality``.
        indistinguishable: the other orientations whose frames fit as well as the best's within
            noise (``excess_z`` below ``significance``): the frames alone cannot choose among
            them; :meth:`relation` says what they differ by and what would decide.
        instrument: the instrument as given (its orientation is what the user has now).
        frame_indices: the scan's frames used (spread over the scan).
        total_frames: frames in the scan.
        significance: the standard errors of ``excess_z`` that reject an orientation.
    """

    rows: tuple[OrientationScore, ...]
    best: Orientation
    indistinguishable: tuple[Orientation, ...]
    instrument: Instrument
    frame_indices: np.ndarray
    total_frames: int
    significance: float = SIGNIFICANCE

    def row(self, orientation: Orientation | str) -> OrientationScore:
        """The score of an orientation (or its name)."""
        name = orientation if isinstance(orientation, str) else orientation.name
        for row in self.rows:
            if row.orientation.name == name:
                return row
        raise InputError(f"no orientation {name!r} in this report")

    @property
    def candidates(self) -> tuple[Orientation, ...]:
        """The best orientation and those the frames cannot tell from it."""
        return (self.best, *self.indistinguishable)

    @property
    def decided(self) -> bool:
        """True when the frames single out one orientation."""
        return not self.indistinguishable

    @property
    def current(self) -> Orientation:
        """The orientation the given instrument describes."""
        return _of_instrument(self.instrument)

    @property
    def current_is_consistent(self) -> bool:
        """True when the instrument's orientation is among the :attr:`candidates`."""
        return self.current in self.candidates

    def relation(self, other: Orientation) -> tuple[str, str]:
        """How ``other`` reads the frames compared with :attr:`best`, and what tells them apart."""
        return _relation(self.best, other)

    def summary(self) -> str:
        """A few lines for the terminal: the best orientation as the instrument's YAML keys, the
        ones the frames cannot tell from it and what would, and whether the instrument agrees."""
        best = self.row(self.best)
        lines = [
            f"Detector orientation from {len(self.frame_indices)} of {self.total_frames} frames "
            "(median fit_quality: about 0 where the physics describes the frames):",
            f"  best: {self.best.name} (median fit_quality {best.median_fit_quality:.2f}, "
            f"{best.flagged_fraction:.0%} of frames flagged); in the instrument YAML:",
            self.best.yaml(indent="    "),
        ]
        if self.indistinguishable:
            lines.append(
                f"  as good within noise (< {self.significance:g} standard errors; which of these scores "
                "lowest is chance): the frames alone cannot choose among"
            )
            for other in self.indistinguishable:
                row = self.row(other)
                what, decide = self.relation(other)
                lines.append(
                    f"    {other.name} (median {row.median_fit_quality:.2f}, {row.excess_z:+.1f} SE): "
                    f"{what}; to tell: {decide}"
                )
        rejected = [r for r in self.rows if r.orientation not in self.candidates]
        if rejected:
            worst = ", ".join(f"{r.orientation.name} ({r.median_fit_quality:.3g})" for r in rejected)
            lines.append(f"  rejected (median fit_quality): {worst}")
        current = self.current
        if current == self.best and self.decided:
            verdict = "is the one these frames single out"
        elif current == self.best:
            verdict = "scores best, by chance against those above: keep it unless their checks say otherwise"
        elif self.current_is_consistent:
            verdict = "fits as well: keep it unless the checks above say otherwise"
        else:
            verdict = "does not describe these frames: set the keys above"
            if self.indistinguishable:
                verdict += ", then settle the signs with the checks above"
        lines.append(f"  the instrument's orientation ({current.name}) {verdict}.")
        return "\n".join(lines)


def _subset(n: int, max_frames: int) -> np.ndarray:
    """Up to ``max_frames`` frame indices spread evenly over ``n``, increasing."""
    return np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(np.int64))


def _read(raw_rois: Any, index: np.ndarray) -> np.ndarray:
    """The frames ``index`` of an array, or of an array-like that reads lazily (h5py, dask)."""
    if isinstance(raw_rois, np.ndarray):
        return raw_rois[index]
    if hasattr(raw_rois, "__getitem__"):
        return np.asarray(raw_rois[index])
    return np.asarray(raw_rois)[index]


def _paired_excess(fq: np.ndarray, best: np.ndarray) -> tuple[float, float]:
    """Mean excess of ``fq`` over ``best`` frame by frame, and that mean in standard errors."""
    both = np.isfinite(fq) & np.isfinite(best)
    diff = fq[both] - best[both]
    if not len(diff):
        return math.nan, math.nan
    mean = float(diff.mean())
    # With one frame there is no spread to measure: sqrt(2), the spread of the difference of two
    # independent z-scores, bounds it.
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else math.sqrt(2)
    if mean <= 1e-9:  # as good or better (exact symmetries give 0 with no spread)
        return mean, min(0.0, mean / max(sd, 1e-12) * math.sqrt(len(diff)))
    return mean, mean / max(sd, 1e-12) * math.sqrt(len(diff))


def check_orientation(
    raw_rois: np.ndarray,
    predictor: Predictor,
    instrument: Instrument | None = None,
    *,
    max_frames: int = 256,
    significance: float = SIGNIFICANCE,
) -> OrientationReport:
    """Read a scan's raw ROIs with each of the eight orientations and say which the physics fits.

    For every orientation the frames are oriented, binned and analysed by ``predictor`` with its
    physics check (the network's estimate, a likelihood step, ``fit_quality``). The best is the
    one with the lowest median ``fit_quality``; another is indistinguishable from it when its
    frames fit worse, frame by frame, by less than ``significance`` standard errors of the mean
    difference (Vuong's test of two non-nested models on the same data: the deviance difference
    of one frame has a spread that the frames themselves measure).

    Args:
        raw_rois: (N, R, R) raw ROIs in counts, in the detector's own orientation (as read from the
            file; R = ``roi_pixels``, 128 by default). An h5py or dask array is read only at the
            frames used.
        predictor: a model for this instrument's physics (:func:`~nanobeam_bluesky.load_pretrained`).
        instrument: the data's instrument (mask, saturation, physics); None: the model's. Its
            orientation keys are replaced by each orientation's.
        max_frames: at most this many frames, spread evenly over the scan, are used.
        significance: standard errors by which an orientation must fit worse than the best to be
            rejected.

    Raises InputError for frames that are not raw ROIs, and
    :class:`~nanobeam_bluesky.inference.InstrumentMismatchError` when the instrument's physics is
    not the model's.
    """
    base = instrument or predictor.instrument
    shape = tuple(getattr(raw_rois, "shape", np.shape(raw_rois)))
    roi = base.roi_pixels
    if len(shape) != 3 or shape[1:] != (roi, roi):
        raise InputError(
            f"check_orientation takes raw ROIs (N, {roi}, {roi}) in the detector's own orientation; got "
            f"shape {shape}. Binned frames are already oriented: cut the {roi} x {roi} ROI from the "
            "detector images instead."
        )
    if max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {max_frames}")
    if shape[0] == 0:
        raise InputError("check_orientation needs at least one frame")
    index = _subset(shape[0], max_frames)
    raw = np.ascontiguousarray(_read(raw_rois, index))
    model = FrameModel.for_instrument(base)

    results = []
    for orientation in ORIENTATIONS:
        inst = orientation.apply(base)
        reader = predictor.for_detector(inst)
        prepared = reader.prepare(raw, instrument=inst)
        analysed = reader.analyse(raw, instrument=inst)
        fit_quality = analysed.checks["fit_quality"]
        valued = np.flatnonzero((analysed.flags & FLAG_DTYPE(NO_VALUE)) == 0)
        summed_model = np.zeros(prepared.counts.shape[1:])
        if len(valued):
            strain, omega, chi = analysed.values[valued].T
            expected = model.render(
                strain,
                omega,
                chi,
                scale=analysed.checks["count_scale"][valued],
                background=analysed.checks["background"][valued],
            ).astype(np.float64)
            if prepared.masked is not None:
                expected[prepared.masked[valued]] = 0.0
            summed_model = expected.sum(axis=0)
        wrong = analysed.flags & FLAG_DTYPE(ORIENTATION_FLAGS)
        results.append(
            {
                "orientation": orientation,
                "median_fit_quality": float(np.nanmedian(fit_quality))
                if np.isfinite(fit_quality).any()
                else math.nan,
                "flagged_fraction": float(np.mean(wrong != 0)),
                "flag_counts": {
                    name: int(np.count_nonzero(analysed.flags & FLAG_DTYPE(bit)))
                    for name, bit in Flag.__members__.items()
                    if bit and bit & ORIENTATION_FLAGS
                },
                "fit_quality": fit_quality,
                "summed_frame": prepared.counts.sum(axis=0, dtype=np.float64),
                "summed_model": summed_model,
                "modelled_frames": len(valued),
            }
        )
    medians = np.array([r["median_fit_quality"] for r in results])
    best_i = int(np.argmin(np.where(np.isfinite(medians), medians, np.inf)))
    rows = []
    for r in results:
        excess, excess_z = _paired_excess(r["fit_quality"], results[best_i]["fit_quality"])
        rows.append(OrientationScore(excess=excess, excess_z=excess_z, **r))
    best = ORIENTATIONS[best_i]
    indistinguishable = tuple(
        row.orientation
        for row in rows
        if row.orientation != best and not (row.excess_z >= significance)  # NaN: cannot tell
    )
    return OrientationReport(
        rows=tuple(rows),
        best=best,
        indistinguishable=indistinguishable,
        instrument=base,
        frame_indices=index,
        total_frames=int(shape[0]),
        significance=significance,
    )


def save_orientation_figure(report: OrientationReport, path: str | Path) -> Path:
    """A PNG: for each orientation, the scan's frames read that way (summed) beside the forward
    model's at the fitted parameters (summed), titled with the orientation and its median
    ``fit_quality``; the best framed in green, those the frames cannot tell from it in orange.

    Each pair shares one colour scale, with a colour bar in counts.
    """
    path = Path(path)
    fig = Figure(figsize=(15.0, 13.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 4)
    for k, row in enumerate(report.rows):
        pair = axes[k // 2, 2 * (k % 2) : 2 * (k % 2) + 2]
        top = max(float(row.summed_frame.max()), float(row.summed_model.max()), 1.0)
        orientation = row.orientation
        if orientation == report.best:
            colour, mark = "tab:green", "best"
        elif orientation in report.indistinguishable:
            colour, mark = "tab:orange", f"as good, {row.excess_z:+.1f} SE"
        else:
            colour, mark = "0.5", f"rejected, {row.excess_z:+.0f} SE"
        image = None
        for ax, data, what in (
            (pair[0], row.summed_frame, f"frames ({len(report.frame_indices)})"),
            (pair[1], row.summed_model, f"model ({row.modelled_frames})"),
        ):
            image = ax.imshow(data, cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
            ax.set_title(f"{orientation.name}: {what}", fontsize=9, color=colour)
            ax.set_xlabel("column (2θ →)", fontsize=7)
            ax.set_ylabel("row (+x ↓)", fontsize=7)
            ax.tick_params(labelsize=6)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3.0 if colour != "0.5" else 0.8)
        pair[0].text(
            0.02,
            0.97,
            f"median fit_quality {row.median_fit_quality:.3g}\n{mark}",
            transform=pair[0].transAxes,
            va="top",
            fontsize=8,
            color="white",
            bbox={"facecolor": colour, "alpha": 0.8, "edgecolor": "none"},
        )
        assert image is not None
        fig.colorbar(image, ax=pair.tolist(), shrink=0.8, label="counts (summed)")
    fig.suptitle(
        f"Detector orientation: {len(report.frame_indices)} of {report.total_frames} frames read each way "
        f"(physics.md's frame) beside the forward model at the fitted parameters; best: {report.best.name}",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    return path
