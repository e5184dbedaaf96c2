"""Training NanobeamNN: data, recipes, the member loop and ensembles (CLI: ``nanobeam train``)."""

from .data import GridData, OnTheFlyData, Standardiser, make_data, noisy_counts, random_parameters
from .ensemble import model_metadata, train_ensemble
from .recipes import DEFAULT_RECIPE, PAPER_RECIPE, RECIPES, REGISTERED_RECIPE, Recipe
from .trainer import (
    MemberResult,
    Objective,
    TrainingError,
    crlb_reference,
    evaluate,
    objective_for,
    train_member,
)

__all__ = [
    "DEFAULT_RECIPE",
    "PAPER_RECIPE",
    "RECIPES",
    "REGISTERED_RECIPE",
    "GridData",
    "MemberResult",
    "Objective",
    "OnTheFlyData",
    "Recipe",
    "Standardiser",
    "TrainingError",
    "crlb_reference",
    "evaluate",
    "make_data",
    "model_metadata",
    "noisy_counts",
    "objective_for",
    "random_parameters",
    "train_ensemble",
    "train_member",
]
