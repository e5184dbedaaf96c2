"""nanobeam_bluesky: live strain and tilt maps from scanning X-ray nanodiffraction.

The main entry points: :func:`load_pretrained` (the shipped two-stage NanobeamNN model),
:class:`Predictor`, :mod:`nanobeam_bluesky.physics` (the forward model),
:mod:`nanobeam_bluesky.callbacks` (live analysis in Bluesky) and the ``nanobeam`` command line.
"""

from ._version import __version__
from .inference import Flag, InstrumentMismatchError, Predictor, load_pretrained
from .physics import Instrument

__all__ = ["Flag", "Instrument", "InstrumentMismatchError", "Predictor", "__version__", "load_pretrained"]
