"""Checkpoints without Lightning: the pruned structure stored as data, and ViTClassifier checkpoints read safely.

Everything here loads with ``weights_only=True``: nothing in a file is unpickled, whoever handed it over. A file
that is not what it should be is refused with what it is and what was expected, before any long work starts.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "CLASSIFIER_CHECKPOINT",
    "STRUCTURE_KEY",
    "CheckpointError",
    "ClassifierCheckpoint",
    "current_structure",
    "load_classifier_checkpoint",
    "read_checkpoint",
    "restore_pruned_structure",
    "set_structure",
]

#: Checkpoint key holding the pruned structure (plain data, loadable with ``weights_only=True``).
STRUCTURE_KEY = "pqv_pruned_structure"
_MODEL_ATTRIBUTE = "pqv_pruned_structure"

#: What :func:`load_classifier_checkpoint` expects, in its error messages.
CLASSIFIER_CHECKPOINT = (
    "a pqv-lightning checkpoint: a Lightning .ckpt of pqv_lightning.ViTClassifier (a dict with 'state_dict' "
    "holding 'model.*' weights and 'hyper_parameters' holding 'model_name' and 'num_classes')"
)


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint it was given as; the message says what it is instead."""


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


def read_checkpoint(path: str | os.PathLike, expected: str = "a torch checkpoint", mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with an error that says what is wrong with the file.

    Empty, truncated and non-torch files, and files holding objects that would need unpickling (refused, never
    run), each raise :class:`CheckpointError` naming the file and ``expected``; a missing file raises
    ``FileNotFoundError``. ``mmap`` (default: for zip-format files) maps the tensors instead of reading them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file; expected {expected}.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes), not {expected}: was it written completely?")
    try:
        mapped = zipfile.is_zipfile(path) if mmap is None else mmap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next(
            (line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else ""
        )
        raise CheckpointError(
            f"{str(path)!r} is not {expected}: it cannot be read as a weights-only torch file, because it holds "
            f"objects that would have to be unpickled (refused, nothing was run): {detail[:200]}"
        ) from None
    except Exception as err:  # torch's readers raise EOFError, RuntimeError, IndexError, ... on bad bytes
        first = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else type(err).__name__
        with path.open("rb") as f:
            starts_as_zip = f.read(4) == b"PK\x03\x04"
        hint = ""
        if starts_as_zip and not zipfile.is_zipfile(path):
            hint = " It starts as a torch archive but its end is missing: truncated (a partial copy or write)."
        raise CheckpointError(
            f"{str(path)!r} ({size} bytes) is not {expected}: it cannot be read as a weights-only torch file "
            f"({type(err).__name__}: {first}).{hint}"
        ) from None


@dataclass
class ClassifierCheckpoint:
    """The timm model of a ViTClassifier checkpoint (pruned structure rebuilt, weights loaded) and its settings."""

    model: nn.Module
    hyper_parameters: dict[str, Any]
    pruned: bool


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
    ``model_kwargs``), the pruned structure from its plain-data record, then the ``model.*`` weights load strictly.
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
    weights = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{os.fspath(path)!r}: its weights do not fit {hparams['model_name']!r} built from its own "
            f"hyper-parameters ({str(err).strip().splitlines()[0][:300]})."
        ) from None
    return ClassifierCheckpoint(model.eval(), hparams, current_structure(model) is not None)
