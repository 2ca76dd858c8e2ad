"""The pruned structure inside Lightning checkpoints: stored as plain data, replayed before weights load."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["STRUCTURE_KEY", "current_structure", "restore_pruned_structure", "set_structure"]

#: Checkpoint key holding the pruned structure (plain data, loadable with ``weights_only=True``).
STRUCTURE_KEY = "pqv_pruned_structure"
_MODEL_ATTRIBUTE = "pqv_pruned_structure"


def current_structure(model: nn.Module) -> dict[str, Any] | None:
    """The structure ``model`` was pruned to, or ``None`` for a dense model."""
    return getattr(model, _MODEL_ATTRIBUTE, None)


def set_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Remember on the model which structure it has, so that it is saved and never applied twice."""
    object.__setattr__(model, _MODEL_ATTRIBUTE, structure)


def restore_pruned_structure(model: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Give ``model`` the pruned architecture stored in ``checkpoint`` (weights are loaded afterwards).

    Idempotent: the module hook and the pruning callback may both call it for the same checkpoint.
    Returns whether the checkpoint held a structure.
    """
    structure = checkpoint.get(STRUCTURE_KEY)
    if structure is None:
        return False
    existing = current_structure(model)
    if existing is not None:
        if existing != structure:
            raise ValueError(
                "The model is already pruned to a different structure than the checkpoint's: "
                "load the checkpoint into a dense model of the same configuration."
            )
        return True
    from pqv_lightning.pruning import apply_structure

    apply_structure(model, structure)
    set_structure(model, structure)
    return True
