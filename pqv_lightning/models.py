"""Creating timm models by name, with the checks a user needs before a long run starts."""

from __future__ import annotations

import difflib
import os
import urllib.error
import warnings
from typing import Any

import timm
import torch
import torch.nn as nn

from pqv_lightning.utils.checks import check_int, invalid
from pqv_lightning.utils.torch_files import read_checkpoint

__all__ = [
    "HUB_PREFIX",
    "WeightsUnavailableError",
    "create_timm_model",
    "suggest_model_names",
    "validate_model_name",
    "validate_patch_size",
]

#: A model name that starts so is a Hugging Face hub repo (``hf-hub:timm/deit_small_patch16_224.fb_in1k``): timm
#: reads its architecture and settings from the repo's ``config.json``. ``hf_hub:`` is timm's older spelling.
HUB_PREFIX = "hf-hub:"
_HUB_PREFIXES = (HUB_PREFIX, "hf_hub:")
#: Where a download failure comes from: the hub client and the HTTP stacks below it.
_DOWNLOAD_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")


class WeightsUnavailableError(FileNotFoundError):
    """Hub files (pretrained weights, an ``hf-hub:`` config) that are neither in the local Hugging Face cache nor
    downloadable: offline, no network, no such repo. The message names the model, the offline setting and the
    local-file alternative (``checkpoint_path=``)."""


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

    Accepts pretrained tags (``deit_small_patch16_224.fb_in1k``): only the architecture part is checked. A hub name
    (``hf-hub:<owner>/<repo>``) is checked for its form only: its architecture is in the repo's ``config.json``.
    """
    if name.startswith(_HUB_PREFIXES):
        repo = name.split(":", 1)[1]
        owner, _, rest = repo.partition("/")
        if not owner or not rest or "/" in rest:
            raise invalid("model_name", name, "a timm architecture name, or a hub repo as 'hf-hub:<owner>/<repo>'")
        return
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


def _lightning_weights(path: str, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The timm weights of a LightningModule checkpoint (``state_dict`` entries under ``model.``, the attribute every
    pqv-lightning module keeps its timm model in), to start a new run from."""
    weights = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if str(k).startswith("model.")}
    if not weights:
        raise invalid(
            "checkpoint_path",
            path,
            "a timm weights file, or a Lightning checkpoint of a module that keeps its timm model in `model` "
            "(ViTClassifier); this checkpoint's state_dict has no 'model.*' weights",
        )
    return weights


def _read_weights(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The state dict in a local weights file, weights-only, and the hyper-parameters when it is a Lightning
    checkpoint (its ``model.*`` weights are taken). In a timm training checkpoint the EMA weights, then
    ``state_dict``, then ``model`` (DeiT's releases) are taken, in timm's own order."""
    if path.endswith(".safetensors"):
        return timm.models.load_state_dict(path), None
    state = read_checkpoint(path, "a timm weights file (.pth, .bin, .safetensors) or a ViTClassifier .ckpt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "hyper_parameters" in state:
        return _lightning_weights(path, state), dict(state["hyper_parameters"] or {})
    if isinstance(state, dict):
        key = next((k for k in ("state_dict_ema", "model_ema", "state_dict", "model") if state.get(k) is not None), "")
        state = state[key] if key else state
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise invalid("checkpoint_path", path, "a file holding a state dict (parameter name -> tensor)")
    return timm.models.clean_state_dict(state), None


def _check_weights_fit(
    model_name: str, path: str, state: dict[str, Any], num_classes: int, kwargs: dict, saved_as: dict | None
) -> None:
    """Refuse weights of another width or depth with the layers that differ (in the model's order), before timm
    fails on one of them with a message about something else (in_chans, say). The classifier (re-initialised for
    another class count) and the first convolution's input channels (adapted by timm) may differ. ``saved_as``: a
    Lightning checkpoint's hyper-parameters, named in the message."""
    expected = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs).state_dict()
    classifier = _classifier_name(model_name)
    mismatched = []
    for key, want in expected.items():
        value = state.get(key)
        if value is None or tuple(want.shape) == tuple(value.shape) or key.startswith(classifier + "."):
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
        tail = ""
        if saved_as is not None:
            tail = (
                f". This Lightning checkpoint was trained as model_name={saved_as.get('model_name')!r} with "
                f"model_kwargs={saved_as.get('model_kwargs')}; a checkpoint of a pruned run is no start for a new "
                "one: continue it with ckpt_path (--ckpt_path) or load it with ViTClassifier.from_checkpoint(path)"
            )
        raise invalid(
            "checkpoint_path",
            path,
            f"weights of {model_name!r} built with the same model_kwargs {kwargs} as when they were saved; these do "
            f"not fit: {shown}{more}{tail}",
        )


def _hub_repo(model_name: str) -> str | None:
    """The hub repo that ``model_name``'s pretrained weights come from, when timm knows it."""
    if model_name.startswith(_HUB_PREFIXES):
        return model_name.split(":", 1)[1]
    try:
        return timm.models.get_pretrained_cfg(model_name).hf_hub_id
    except Exception:  # no pretrained config for this name: the message goes without the repo
        return None


def _is_download_failure(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is the hub client or the network failing to fetch a file."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        if type(err).__module__.split(".")[0] in _DOWNLOAD_MODULES:
            return True
        err = err.__cause__ or err.__context__
    return False


def _unavailable(model_name: str, err: BaseException) -> WeightsUnavailableError:
    """The error for hub files that are not in the cache and could not be downloaded: what, why, and the ways out."""
    try:
        from huggingface_hub import constants

        offline, cache = bool(constants.HF_HUB_OFFLINE), constants.HF_HUB_CACHE
    except ImportError:  # timm without the hub client: weights come from URLs, into torch's cache
        offline, cache = False, os.path.join(torch.hub.get_dir(), "checkpoints")
    repo = _hub_repo(model_name)
    what = "The hub files (config and weights)" if model_name.startswith(_HUB_PREFIXES) else "The pretrained weights"
    source = f" (hub repo {repo})" if repo and not model_name.startswith(_HUB_PREFIXES) else ""
    if offline:
        why = "HF_HUB_OFFLINE=1 is set, so nothing is downloaded"
    else:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        why = (
            f"the download failed ({reason.split('. ')[0][:200]}); with no network, HF_HUB_OFFLINE=1 makes this "
            "fail at once instead of after the hub client's retries"
        )
    return WeightsUnavailableError(
        f"{what} of {model_name!r}{source} are not in the local cache ({cache}) and cannot be downloaded: {why}. "
        "Download them once where there is a network (HF_HOME points at the cache to use), or start from a local "
        "file: pretrained=False with checkpoint_path=<timm .safetensors / .pth, or a ViTClassifier .ckpt>."
    )


def _warn_if_classifier_reinitialised(model: nn.Module, model_name: str, num_classes: int, source: str) -> None:
    """Say so when pretrained weights had another class count: timm then drops their classifier silently (a log
    line at INFO level) and the model starts with a random one."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if not names:
        return
    names = (names,) if isinstance(names, str) else tuple(names)
    weights_classes = cfg.get("num_classes")
    if weights_classes == num_classes:
        return
    named = ", ".join(repr(n) for n in names)
    if weights_classes:
        what = f"the classifier {named} of the weights from {source} has {weights_classes} classes"
    else:
        what = f"the weights from {source} hold no classifier {named}"
    warnings.warn(
        f"{model_name}: {what} but num_classes={num_classes}: it is re-initialised (random weights, trained from "
        "scratch by the fit); every other layer is loaded.",
        UserWarning,
        stacklevel=3,
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
        model_name: a timm architecture (optionally with a pretrained tag, ``name.tag``), or a Hugging Face hub repo
            ``hf-hub:<owner>/<repo>`` (architecture and settings from its ``config.json``).
        num_classes: size of the classifier. Weights with another class count get a new, random classifier, with a
            warning naming it; every other layer is loaded.
        pretrained: load timm's released weights (a download on first use, then the Hugging Face cache; with
            ``HF_HUB_OFFLINE=1`` the cache only). Weights that are neither cached nor downloadable raise
            :class:`WeightsUnavailableError` at once, naming the model, the offline setting and ``checkpoint_path``.
        checkpoint_path: start from a local file instead (``pretrained`` is then implied), adapted like hub weights
            by timm (``pretrained_cfg_overlay``: ``in_chans``, the classifier, timm's key filters) and read
            weights-only:

            * a timm weights file: ``.safetensors``, or a ``.pth`` / ``.bin`` holding a state dict (or one under
              ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model``, in timm's order);
            * a Lightning ``.ckpt`` of a dense ``ViTClassifier`` (e.g. your own finetune): its weights start a NEW
              run (epochs, optimizer, schedule and callbacks start afresh), which is how a pruning run starts from
              it (``--model.init_args.checkpoint_path=last.ckpt`` on the command line). To continue that run
              instead, pass it as ``ckpt_path`` (``--ckpt_path``); a checkpoint of a pruned run is refused here
              (its widths do not fit) with that way named.

            Weights of another width or depth are refused before timm sees them, layer by layer.
        model_kwargs: timm keyword arguments (``img_size``, ``patch_size``, ``in_chans``, ``depth``, ``embed_dim``,
            ``drop_path_rate``, ...).
    """
    validate_model_name(model_name)
    validate_patch_size(model_kwargs.get("img_size"), model_kwargs.get("patch_size"))
    check_int("num_classes", num_classes, 1)
    source, given_kwargs = None, dict(model_kwargs)
    if checkpoint_path is not None:
        path = os.fspath(checkpoint_path)
        if model_name.startswith(_HUB_PREFIXES):
            raise invalid(
                "model_name",
                model_name,
                "a timm architecture name with checkpoint_path (a hub name fetches the hub's weights; a local file "
                "needs only the architecture)",
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint_path={path!r} does not exist or is not a file.")
        state, saved_as = _read_weights(path)
        _check_weights_fit(model_name, path, state, num_classes, model_kwargs, saved_as)
        weight = state.get(f"{_classifier_name(model_name)}.weight")
        # timm reads a weights file itself; a Lightning checkpoint's weights (prefix removed) go as a state dict.
        # The file's class count (0: no classifier, timm's convention) tells timm whether to keep its classifier
        # (it otherwise assumes the pretrained config's count).
        overlay = {"file": path} if saved_as is None else {"state_dict": state}
        overlay["num_classes"] = int(weight.shape[0]) if weight is not None else 0
        model_kwargs = {**model_kwargs, "pretrained_cfg_overlay": overlay}
        pretrained, source = True, path
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {model_name!r} rejected the keyword arguments {given_kwargs}: {err}") from err
    except Exception as err:
        if _is_download_failure(err):
            raise _unavailable(model_name, err) from err
        raise
    if source is not None and model.pretrained_cfg.pop("state_dict", None) is not None:
        # the model keeps its pretrained config: the weights themselves must not stay in it (memory, deep copies)
        model.pretrained_cfg["file"] = source
    if pretrained:
        repo = _hub_repo(model_name)
        where = source or (f"hub repo {repo}" if repo else "timm's pretrained weights")
        _warn_if_classifier_reinitialised(model, model_name, num_classes, where)
    return model
