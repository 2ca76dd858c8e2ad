"""Structured pruning engine (plain PyTorch + torch-pruning): prune, record, replay."""

from .batch_norm import recalibrate_batch_norm
from .engine import apply_structure, check_budget, check_supported, count_macs_params, largest_ratio, prune
from .families import FAMILIES
from .spec import IMPORTANCES, PruningResult, PruningSpec, UnsupportedModelError

__all__ = [
    "FAMILIES",
    "IMPORTANCES",
    "PruningResult",
    "PruningSpec",
    "UnsupportedModelError",
    "apply_structure",
    "check_budget",
    "check_supported",
    "count_macs_params",
    "largest_ratio",
    "prune",
    "recalibrate_batch_norm",
]
