"""Token reduction on a timm model, in place: apply, remove, read back, count tokens, and refuse what cannot work.

What is supported, and why the rest is refused (:func:`check_token_reduction`, before any long work):

* timm ``VisionTransformer`` with its standard ``Block`` and ``Attention`` (ViT, DeiT, DeiT III / DINOv2 layer
  scale, register tokens, qk-norm, scale-norm and gated attention, pruned widths), ``VisionTransformerDistilled``
  (class and distillation token) and ``Cait`` (merging in its talking-heads self-attention blocks; the class token
  only enters the class-attention blocks). Class-token or ``"avg"`` pooling (the latter becomes size-weighted).
* Refused: relative position bias (BEiT: a merged token has no position to index the bias table with), rotary
  embeddings (EVA: likewise, positions are rotated into q/k), windows (Swin: a window needs its full token grid),
  2-D stages and convolution hybrids (LeViT, EfficientFormer, MobileViT, FastViT, EfficientViT, PiT, ...: they
  reshape tokens back into an image), any other block or attention class (its forward is unknown), attention
  pooling and max pooling (not defined on merged tokens), no pooling (the output token count would change), and
  ``"prune"`` on a model without a class token (EViT ranks by the class token's attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn as nn
from timm.layers import Attention
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from timm.models.vision_transformer import Block, VisionTransformer

from pqv_lightning.tokens.models import FORM_ATTRIBUTE, REDUCED_CLASSES, SCHEDULE_ATTRIBUTE, SETTINGS_ATTRIBUTE
from pqv_lightning.tokens.spec import FORMS, TokenReduction, capped_r
from pqv_lightning.utils.checks import check_choice, invalid

__all__ = [
    "SUPPORTED",
    "apply_token_reduction",
    "check_token_reduction",
    "is_token_reduced",
    "reduction_form_of",
    "remove_token_reduction",
    "set_reduction_form",
    "token_reduction_of",
    "token_summary",
    "tokens_per_block",
]

#: What :func:`check_token_reduction` accepts, in its refusals.
SUPPORTED = (
    "a timm VisionTransformer (ViT, DeiT, DeiT III, register tokens, DINOv2 layer scale, qk-norm) with its "
    "standard Block/Attention, a VisionTransformerDistilled or a Cait, with class-token or 'avg' pooling"
)
_ORIGINAL = {reduced: original for original, reduced in REDUCED_CLASSES.items()}
#: timm module -> what in it prevents token reduction.
_REASONS = {
    "beit": "relative position bias",
    "eva": "rotary position embedding (RoPE)",
    "swin_transformer": "windowed attention",
    "swin_transformer_v2": "windowed attention",
    "swin_transformer_v2_cr": "windowed attention",
    "levit": "2-D stages (convolution hybrid)",
    "efficientformer": "2-D stages (convolution hybrid)",
    "efficientformer_v2": "2-D stages (convolution hybrid)",
    "mobilevit": "2-D stages (convolution hybrid)",
    "fastvit": "2-D stages (convolution hybrid)",
    "efficientvit_mit": "2-D stages (convolution hybrid)",
    "efficientvit_msra": "2-D stages (convolution hybrid)",
    "pit": "2-D stages (pooling between stages)",
    "pvt_v2": "2-D stages (spatial-reduction attention)",
    "tiny_vit": "2-D stages (convolution hybrid)",
    "xcit": "cross-covariance attention over a 2-D grid",
    "convit": "gated positional self-attention (relative positions)",
    "edgenext": "2-D stages (convolution hybrid)",
    "byobnet": "2-D stages (convolution network; MobileViT is built from it)",
}


def _known(module: nn.Module, types: tuple[type, ...]) -> bool:
    """``module`` is one of ``types`` exactly, or pqv-lightning's own rewrite of one (pruned or export forward)."""
    cls = type(module)
    if cls in types:
        return True
    return issubclass(cls, types) and cls.__module__.startswith("pqv_lightning.")


def _reason(model: nn.Module) -> str:
    family = type(model).__module__.rpartition(".")[2]
    if family in _REASONS:
        return _REASONS[family]
    for module in model.modules():
        names = set(vars(module)) | {n for n, _ in module.named_parameters(recurse=False)}
        names |= {n for n, _ in module.named_buffers(recurse=False)}
        if {"relative_position_bias_table", "relative_position_index"} & names:
            return "relative position bias"
        if any("rope" in name for name in names):
            return "rotary position embedding (RoPE)"
        if "window_size" in names:
            return "windowed attention"
    if hasattr(model, "stages"):
        return "2-D stages"
    return "blocks token reduction does not know"


def _refuse(model: nn.Module, why: str) -> Exception:
    return invalid("model", type(model).__name__, f"{SUPPORTED} ({type(model).__name__}: {why})")


def _pool_problem(pool: str, attn_pool: nn.Module | None) -> str | None:
    if attn_pool is not None:
        return f"attention pooling (global_pool={pool!r}) is not defined on merged tokens"
    if pool not in ("token", "avg"):
        what = "no pooling: the output token count would change" if not pool else "max pooling of merged tokens"
        return f"global_pool={pool!r} ({what}); accepted: 'token' or 'avg'"
    return None


def _check_vit(model: VisionTransformer, spec: TokenReduction | None) -> None:
    for i, blk in enumerate(model.blocks):
        if not _known(blk, (Block,)):
            raise _refuse(model, f"blocks.{i} is a {type(blk).__name__}, not timm's Block")
        if not _known(blk.attn, (Attention,)):
            raise _refuse(model, f"blocks.{i}.attn is a {type(blk.attn).__name__}, not timm's Attention")
    problem = _pool_problem(model.global_pool, model.attn_pool)
    if problem is not None:
        raise _refuse(model, problem)
    if spec is not None and spec.method == "prune" and model.cls_token is None:
        raise invalid("method", "prune", f"'merge' for {type(model).__name__}: it has no class token to rank by")


def _check_cait(model: Cait, spec: TokenReduction | None) -> None:
    for i, blk in enumerate(model.blocks):
        if not (_known(blk, (LayerScaleBlock,)) and _known(blk.attn, (TalkingHeadAttn,))):
            raise _refuse(model, f"blocks.{i} is a {type(blk).__name__} with {type(blk.attn).__name__}")
    for i, blk in enumerate(model.blocks_token_only or ()):
        if not (_known(blk, (LayerScaleBlockClassAttn,)) and _known(blk.attn, (ClassAttn,))):
            raise _refuse(model, f"blocks_token_only.{i} is a {type(blk).__name__} with {type(blk.attn).__name__}")
    problem = _pool_problem(model.global_pool, None)
    if problem is not None:
        raise _refuse(model, problem)
    if spec is not None and spec.method == "prune":
        raise invalid("method", "prune", "'merge' for Cait: its self-attention blocks have no class token to rank by")


def _base_class(model: nn.Module) -> type | None:
    cls = type(model)
    return cls if cls in REDUCED_CLASSES else _ORIGINAL.get(cls)


def check_token_reduction(model: nn.Module, spec: TokenReduction | None = None) -> None:
    """Refuse a model (or ``spec`` on it) token reduction cannot run correctly, naming what prevents it.

    Raises :class:`~pqv_lightning.utils.checks.InvalidArgumentError` (``model=... is invalid; accepted: ...``).
    """
    if not isinstance(model, nn.Module):
        raise invalid("model", type(model).__name__, "a torch.nn.Module (a timm vision transformer)")
    base = _base_class(model)
    if base is None:
        raise _refuse(model, _reason(model))
    if base is Cait:
        _check_cait(model, spec)
    else:
        _check_vit(model, spec)
    if spec is not None:
        spec.per_block(len(model.blocks))


def is_token_reduced(model: nn.Module) -> bool:
    """Whether :func:`apply_token_reduction` was applied to ``model`` (and not removed)."""
    return type(model) in _ORIGINAL and isinstance(getattr(model, SETTINGS_ATTRIBUTE, None), dict)


def token_reduction_of(model: nn.Module) -> TokenReduction | None:
    """The reduction ``model`` runs with, or ``None``."""
    return TokenReduction.from_dict(getattr(model, SETTINGS_ATTRIBUTE)) if is_token_reduced(model) else None


def apply_token_reduction(model: nn.Module, spec: TokenReduction) -> nn.Module:
    """Give ``model`` token reduction ``spec`` in place and return it (checked first; applying again replaces the
    settings). Modules, parameters and ``state_dict`` keys are unchanged; the settings are plain data on the
    model (copied with it by ``copy.deepcopy``)."""
    if not isinstance(spec, TokenReduction):
        raise invalid("spec", spec, "a pqv_lightning.tokens.TokenReduction")
    check_token_reduction(model, spec)
    schedule = spec.per_block(len(model.blocks))
    model.__class__ = REDUCED_CLASSES[_base_class(model)]
    object.__setattr__(model, SETTINGS_ATTRIBUTE, spec.as_dict())
    object.__setattr__(model, SCHEDULE_ATTRIBUTE, tuple(schedule))
    return model


def remove_token_reduction(model: nn.Module) -> nn.Module:
    """Give ``model`` back its timm class and forward (in place; a model without reduction is returned as is)."""
    original = _ORIGINAL.get(type(model))
    if original is not None:
        model.__class__ = original
    for name in (SETTINGS_ATTRIBUTE, SCHEDULE_ATTRIBUTE, FORM_ATTRIBUTE):
        if name in vars(model):
            object.__delattr__(model, name)
    return model


def set_reduction_form(model: nn.Module, form: str) -> nn.Module:
    """Make a token-reduced ``model`` move its tokens in ``form`` (:data:`~pqv_lightning.tokens.spec.FORMS`; the
    same function, see :mod:`pqv_lightning.tokens.slots`), in place; returns it. A model without reduction is
    refused."""
    check_choice("form", form, FORMS)
    if not is_token_reduced(model):
        raise invalid("model", type(model).__name__, "a model with token reduction (apply_token_reduction)")
    object.__setattr__(model, FORM_ATTRIBUTE, form)
    return model


def reduction_form_of(model: nn.Module) -> str | None:
    """How a token-reduced ``model`` moves its tokens (``None``: it has no reduction)."""
    return getattr(model, FORM_ATTRIBUTE, "gather") if is_token_reduced(model) else None


def _grid_tokens(model: nn.Module, img_size: int | Sequence[int] | None) -> int:
    embed = model.patch_embed
    if img_size is None:
        return int(embed.num_patches)
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    ph, pw = embed.patch_size
    rounding = math.ceil if getattr(embed, "dynamic_img_pad", False) else math.floor
    return int(rounding(h / ph) * rounding(w / pw))


def tokens_per_block(model: nn.Module, img_size: int | Sequence[int] | None = None) -> list[int]:
    """Tokens entering each reducing block, then the tokens leaving the last one (``depth + 1`` counts), for
    ``img_size`` images (default: the model's). Prefix tokens count (ViT); CaiT's count its patch tokens (the class
    token joins after these blocks). A model without reduction gives the same count throughout."""
    check_token_reduction(model)
    prefix = 0 if _base_class(model) is Cait else int(model.num_prefix_tokens)
    count = _grid_tokens(model, img_size) + prefix
    spec = token_reduction_of(model)
    schedule = getattr(model, SCHEDULE_ATTRIBUTE) if spec is not None else (0,) * len(model.blocks)
    counts = [count]
    for r in schedule:
        count -= capped_r(r, count - prefix)
        counts.append(count)
    return counts


def token_summary(model: nn.Module, img_size: int | Sequence[int] | None = None) -> dict | None:
    """What an exported file of ``model`` records about its token reduction (``None``: it has none): the method,
    ``r`` and the tokens entering each block and leaving the last, for ``img_size`` images (plain data)."""
    spec = token_reduction_of(model)
    if spec is None:
        return None
    return {"method": spec.method, "r": spec.r, "tokens_per_block": tokens_per_block(model, img_size)}
