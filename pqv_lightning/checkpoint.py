"""Checkpoints without Lightning: the pruned structure and the token reduction stored as data, and ViTClassifier
checkpoints read safely.

Everything here loads with ``weights_only=True``: nothing in a file is unpickled, whoever handed it over. A file
that is not what it should be is refused with what it is and what was expected, before any long work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from pqv_lightning.utils.torch_files import CheckpointError, read_checkpoint

__all__ = [
    "CLASSIFIER_CHECKPOINT",
    "STRUCTURE_KEY",
    "TOKENS_KEY",
    "CheckpointError",
    "ClassifierCheckpoint",
    "current_structure",
    "load_classifier_checkpoint",
    "read_checkpoint",
    "restore_pruned_structure",
    "restore_token_reduction",
    "set_structure",
]

#: Checkpoint key holding the pruned structure (plain data, loadable with ``weights_only=True``).
STRUCTURE_KEY = "pqv_pruned_structure"
_MODEL_ATTRIBUTE = "pqv_pruned_structure"
#: Checkpoint key holding the token reduction the model runs with (``TokenReduction.as_dict()``, plain data).
TOKENS_KEY = "pqv_token_reduction"

#: What :func:`load_classifier_checkpoint` expects, in its error messages.
CLASSIFIER_CHECKPOINT = (
    "a pqv-lightning checkpoint: a Lightning .ckpt of pqv_lightning.ViTClassifier (a dict with 'state_dict' "
    "holding 'model.*' weights and 'hyper_parameters' holding 'model_name' and 'num_classes')"
)


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


def restore_token_reduction(model: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Give ``model`` the token reduction stored in ``checkpoint`` (ToMe merging or EViT pruning; parameters are
    unchanged, so before or after the weights load alike). Idempotent; the checkpoint's settings replace any the
    model has. Returns whether the checkpoint held a reduction.
    """
    stored = checkpoint.get(TOKENS_KEY)
    if stored is None:
        return False
    from pqv_lightning.tokens import TokenReduction, apply_token_reduction

    apply_token_reduction(model, TokenReduction.from_dict(stored))
    return True


@dataclass
class ClassifierCheckpoint:
    """The timm model of a ViTClassifier checkpoint (pruned structure and token reduction rebuilt, weights loaded)
    and its settings."""

    model: nn.Module
    hyper_parameters: dict[str, Any]
    pruned: bool
    token_reduction: dict[str, Any] | None = None


def _classifier_problem(checkpoint: Any) -> str | None:
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    if not isinstance(checkpoint.get("state_dict"), dict):
        return f"it has no 'state_dict' (keys: {sorted(map(str, checkpoint))[:8]})"
    if not isinstance(checkpoint.get("hyper_parameters"), dict):
        return "it has no 'hyper_parameters'"
    missing = [key for key in ("model_name", "num_classes") if key not in checkpoint["hyper_parameters"]]
    if missing:
        return f"its hyper_parameters lack {missing}"
    if not any(str(key).startswith("model.") for key in checkpoint["state_dict"]):
        return "its state_dict has no 'model.*' weights"
    return None


def load_classifier_checkpoint(path: str | os.PathLike) -> ClassifierCheckpoint:
    """The timm model stored in a ViTClassifier checkpoint, rebuilt without Lightning (weights-only read).

    The architecture comes from the checkpoint's hyper-parameters (``model_name``, ``num_classes``,
    ``model_kwargs``), the pruned structure and the token reduction from their plain-data records, then the
    ``model.*`` weights load strictly.
    """
    from pqv_lightning.models import create_timm_model

    checkpoint = read_checkpoint(path, CLASSIFIER_CHECKPOINT)
    problem = _classifier_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{os.fspath(path)!r} is not {CLASSIFIER_CHECKPOINT}: {problem}.")
    hparams = dict(checkpoint["hyper_parameters"])
    model = create_timm_model(
        hparams["model_name"], num_classes=int(hparams["num_classes"]), **dict(hparams.get("model_kwargs") or {})
    )
    restore_pruned_structure(model, checkpoint)
    restore_token_reduction(model, checkpoint)
    weights = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{os.fspath(path)!r}: its weights do not fit {hparams['model_name']!r} built from its own "
            f"hyper-parameters ({str(err).strip().splitlines()[0][:300]})."
        ) from None
    tokens = checkpoint.get(TOKENS_KEY)
    return ClassifierCheckpoint(model.eval(), hparams, current_structure(model) is not None, tokens)
