"""Creating timm models by name, with the checks a user needs before a long run starts."""

from __future__ import annotations

import difflib
import os
from typing import Any

import timm
import torch.nn as nn

from pqv_lightning.utils.checks import check_int

__all__ = ["create_timm_model", "suggest_model_names", "validate_model_name", "validate_patch_size"]


def suggest_model_names(name: str, limit: int = 5) -> list[str]:
    """Close matches of ``name`` among timm's architectures (for 'did you mean' messages)."""
    candidates = timm.list_models()
    matches = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.6)
    if not matches:
        stem = name.split("_")[0]
        matches = [c for c in candidates if c.startswith(stem)][:limit]
    return matches


def validate_model_name(name: str) -> None:
    """Raise a ``ValueError`` naming close matches if timm has no architecture called ``name``.

    Accepts pretrained tags (``deit_small_patch16_224.fb_in1k``): only the architecture part is checked.
    """
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return
    hint = suggest_model_names(architecture)
    tail = f" Did you mean: {', '.join(hint)}?" if hint else " See timm.list_models() for the accepted names."
    raise ValueError(f"Unknown timm model name {name!r}.{tail}")


def validate_patch_size(img_size: Any, patch_size: Any) -> None:
    """Raise if the patch size does not tile the image size (timm fails much later, deep in a forward)."""
    if img_size is None or patch_size is None:
        return
    sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    patches = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    for size, patch in zip(sizes, patches):
        if patch <= 0 or size % patch:
            raise ValueError(
                f"img_size={img_size!r} is not divisible by patch_size={patch_size!r}: "
                "choose an image size that is a multiple of the patch size."
            )


def _checkpoint_classes(model_name: str, path: str) -> int | None:
    """Classifier size stored in a local weights file, so timm keeps a matching head instead of
    re-initialising it (timm otherwise assumes the pretrained config's class count)."""
    classifier = timm.get_pretrained_cfg(model_name.split(".", 1)[0]).to_dict().get("classifier") or "head"
    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    state = timm.models.load_state_dict(path, weights_only=True)
    weight = state.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def create_timm_model(
    model_name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Create a timm model by name, optionally with weights.

    Args:
        model_name: a timm architecture (optionally with a pretrained tag, ``name.tag``).
        num_classes: size of the classifier; timm re-initialises it when pretrained weights have another size.
        pretrained: load timm's released weights (downloads from the hub on first use).
        checkpoint_path: load weights from a local file instead, through timm's own pretrained-file mechanism
            (``pretrained_cfg_overlay={"file": ...}``): it adapts ``in_chans`` and the classifier like hub weights,
            and loads with ``weights_only=True``.
        model_kwargs: timm keyword arguments (``img_size``, ``patch_size``, ``in_chans``, ``depth``, ``embed_dim``,
            ``drop_path_rate``, ...).
    """
    validate_model_name(model_name)
    validate_patch_size(model_kwargs.get("img_size"), model_kwargs.get("patch_size"))
    check_int("num_classes", num_classes, 1)
    if checkpoint_path is not None:
        path = os.fspath(checkpoint_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint_path={path!r} does not exist or is not a file.")
        overlay = {"file": path, "num_classes": _checkpoint_classes(model_name, path)}
        model_kwargs = {**model_kwargs, "pretrained_cfg_overlay": overlay}
        pretrained = True
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {model_name!r} rejected the keyword arguments {model_kwargs}: {err}") from err
