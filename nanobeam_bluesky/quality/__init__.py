"""Trust in every number: plausibility before the model, physics consistency after it.

* :class:`Flag`: the per-frame quality bits every result carries.
* :func:`prepare_frames`: orientation, binning, masks, and the flags for what no detector can
  produce (saturated, hot, non-integer, invalid, too few counts).
* :class:`PhysicsCheck`: the forward model at the estimate -- a likelihood step to the
  Cramer-Rao bound, per-frame errors from the Fisher information, ``fit_quality`` (deviance
  z-score), the film-thickness test and the ring test.
* ``KERNEL_LOCK``: held around every parallel numba kernel of the package (training's too).
"""

from .._schema import FLAG_BITS, FLAG_DTYPE, NO_VALUE, Flag, flag_attributes, flag_description
from ._consistency import (
    MIN_RING_FRACTION,
    POOR_FIT_Z,
    THICKNESS_Z,
    Consistency,
    PhysicsCheck,
    PooledConsistency,
)
from ._deviance import deviance_moments, unit_deviance_moments
from ._kernel import KERNEL_LOCK
from ._plausibility import PreparedFrames, binned_instrument_mask, prepare_frames

__all__ = [
    "FLAG_BITS",
    "FLAG_DTYPE",
    "KERNEL_LOCK",
    "MIN_RING_FRACTION",
    "NO_VALUE",
    "POOR_FIT_Z",
    "THICKNESS_Z",
    "Consistency",
    "Flag",
    "PhysicsCheck",
    "PooledConsistency",
    "PreparedFrames",
    "binned_instrument_mask",
    "deviance_moments",
    "flag_attributes",
    "flag_description",
    "prepare_frames",
    "unit_deviance_moments",
]
