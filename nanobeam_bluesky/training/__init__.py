"""Training NanobeamNN: data, recipes, the member loop and ensembles (CLI: ``nanobeam train``)."""

from .data import GridData, OnTheFlyData, Standardiser, make_data, noisy_counts, random_parameters
from .ensemble import model_metadata, train_ensemble
from .recipes import DEFAULT_RECIPE, PAPER_RECIPE, RECIPES, Recipe
from .trainer import MemberResult, crlb_reference, evaluate, train_member

__all__ = [
    "DEFAULT_RECIPE",
    "PAPER_RECIPE",
    "RECIPES",
    "GridData",
    "MemberResult",
    "OnTheFlyData",
    "Recipe",
    "Standardiser",
    "crlb_reference",
    "evaluate",
    "make_data",
    "model_metadata",
    "noisy_counts",
    "random_parameters",
    "train_ensemble",
    "train_member",
]
