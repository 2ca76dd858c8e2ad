"""Creating timm models by name, with the checks a user needs before a long run starts."""

from __future__ import annotations

import difflib
import os
from typing import Any

import timm
import torch.nn as nn

from pqv_lightning.utils.checks import check_int, invalid
from pqv_lightning.utils.torch_files import read_checkpoint

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


def _classifier_name(model_name: str) -> str:
    classifier = timm.get_pretrained_cfg(model_name.split(".", 1)[0]).to_dict().get("classifier") or "head"
    return classifier[0] if isinstance(classifier, (tuple, list)) else classifier


def _read_weights(path: str) -> dict[str, Any]:
    """The state dict in a local weights file, weights-only; a Lightning checkpoint is refused with the way to
    load it (its weights sit under ``state_dict`` with the module's prefix, and may need a pruned structure)."""
    if path.endswith(".safetensors"):
        return timm.models.load_state_dict(path)
    state = read_checkpoint(path, "a timm state-dict file (.pth, .bin, .safetensors)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "hyper_parameters" in state:
        raise invalid(
            "checkpoint_path",
            path,
            "a timm state-dict file (.pth, .bin, .safetensors); this is a Lightning checkpoint: load it with "
            "ViTClassifier.from_checkpoint(path), or resume a fit from it with ckpt_path (--ckpt_path)",
        )
    return timm.models.clean_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)


def _check_weights_fit(model_name: str, path: str, state: dict[str, Any], num_classes: int, kwargs: dict) -> None:
    """Refuse weights of another width or depth with the layers that differ, before timm fails on one of them
    with a message about something else (in_chans, say). The classifier (re-initialised for another class
    count) and the first convolution's input channels (adapted by timm) may differ."""
    expected = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs).state_dict()
    classifier = _classifier_name(model_name)
    mismatched = []
    for key, value in state.items():
        want = expected.get(key)
        if want is None or tuple(want.shape) == tuple(value.shape) or key.startswith(classifier + "."):
            continue
        if (
            value.dim() == 4
            and want.dim() == 4
            and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]
        ):
            continue  # in_chans differs: timm adapts the first convolution
        mismatched.append(f"{key}: {list(value.shape)} in the file, {list(want.shape)} in the model")
    missing = [key for key in expected if key not in state and not key.startswith(classifier + ".")]
    if mismatched or len(missing) > len(expected) // 2:
        shown = "; ".join(mismatched[:3]) or f"{len(missing)} of the model's {len(expected)} tensors are missing"
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise invalid(
            "checkpoint_path",
            path,
            f"weights of {model_name!r} built with the same model_kwargs {kwargs} as when they were saved; these do "
            f"not fit: {shown}{more}",
        )


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
        state = _read_weights(path)
        _check_weights_fit(model_name, path, state, num_classes, model_kwargs)
        weight = state.get(f"{_classifier_name(model_name)}.weight")
        # the file's class count, so timm keeps a matching head instead of re-initialising it (it otherwise
        # assumes the pretrained config's class count)
        overlay = {"file": path, "num_classes": int(weight.shape[0]) if weight is not None else None}
        model_kwargs = {**model_kwargs, "pretrained_cfg_overlay": overlay}
        pretrained = True
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {model_name!r} rejected the keyword arguments {model_kwargs}: {err}") from err
