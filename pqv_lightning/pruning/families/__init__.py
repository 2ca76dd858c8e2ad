"""The model families the pruning engine knows, one module each, registered by name.

A family handler (:class:`~pqv_lightning.pruning.families.base.Family`) says which models it matches, what it
may prune and how, and which derived attributes it fixes afterwards, so that a pruned network computes a correct
function and its structure replays without tracing. A model no family matches is refused by name.
"""

from __future__ import annotations

import torch.nn as nn

from pqv_lightning.pruning.families.base import Family, Unit, kept_channels, unit_inputs
from pqv_lightning.pruning.families.efficientvit import EfficientViTMITFamily, EfficientViTMSRAFamily
from pqv_lightning.pruning.families.vit import ViTFamily
from pqv_lightning.pruning.spec import UnsupportedModelError
from pqv_lightning.utils.checks import invalid

__all__ = [
    "FAMILIES",
    "Family",
    "Unit",
    "family_by_name",
    "family_of",
    "kept_channels",
    "register_family",
    "unit_inputs",
]

#: The registered families, in matching order (the first that matches a model handles it).
FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add a family handler (its ``name`` must be new); returns it, so a module can register at import."""
    if not isinstance(family, Family) or not family.name:
        raise invalid("family", family, "a Family instance with a name")
    if any(f.name == family.name for f in FAMILIES):
        raise invalid("family", family.name, f"a new name (registered: {', '.join(f.name for f in FAMILIES)})")
    FAMILIES.append(family)
    return family


for _family in (ViTFamily(), EfficientViTMITFamily(), EfficientViTMSRAFamily()):
    register_family(_family)


def family_of(model: nn.Module) -> Family:
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise UnsupportedModelError(
        f"model type {type(model).__module__}.{type(model).__name__} is not supported for structured "
        "pruning; supported families: " + "; ".join(f.description for f in FAMILIES) + "."
    )


def family_by_name(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown family {name!r}; known: {[f.name for f in FAMILIES]}")
