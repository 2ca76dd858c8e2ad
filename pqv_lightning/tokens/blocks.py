"""Transformer blocks with token reduction: the attention that also returns the matching metric, and the block
that reduces tokens after the attention residual and before the MLP (where ToMe and EViT do).

These are functions over timm's own modules (``Block`` + ``Attention``; CaiT's ``LayerScaleBlock`` +
``TalkingHeadAttn`` and ``LayerScaleBlockClassAttn`` + ``ClassAttn``), called by the reduced models of
:mod:`pqv_lightning.tokens.models`: no module is replaced and no parameter added, so ``state_dict`` keys stay the
model's, pruned models (whose attention widths changed) work as they are, and so do the forward classes
pqv-lightning swaps in (pruned CaiT attention; the XNNPACK rewrites of
:func:`pqv_lightning.export.prepare_for_xnnpack`).

The attention follows the module's ``fused_attn``: ``True`` calls ``F.scaled_dot_product_attention`` with the
module's stored ``scale`` (training speed; the proportional-attention bias is its float mask); ``False`` computes
the same function as 3-D ``bmm`` over ``[B * heads, N, head_dim]`` with q/k/v sliced from the last dim of ``qkv``,
the form :mod:`pqv_lightning.export.xnnpack_rewrites` gives timm's attention, honouring a ``products_dtype`` (fp16
attention products) where the module has one. ``prepare_for_xnnpack`` turns ``fused_attn`` off. An export rewrite
that replaces timm's ``Attention`` by a module of its own registers that module's token-aware forward
(:func:`register_token_attention`; onnxruntime's fusable attention does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.cait import ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pqv_lightning.tokens.matching import bipartite_soft_matching, merge_wavg
from pqv_lightning.tokens.pruning import fuse_inattentive
from pqv_lightning.tokens.slots import merge_slots, prune_slots, reduce_by_slots
from pqv_lightning.tokens.spec import FORMS, capped_r
from pqv_lightning.utils.checks import check_choice, invalid

__all__ = [
    "METRICS",
    "TokenAttention",
    "attend",
    "class_attention",
    "class_attention_block",
    "reduce_tokens",
    "reducing_block",
    "register_token_attention",
    "size_bias",
    "talking_head_attention",
    "timm_attention",
]

#: The matching metric each method needs from the attention: keys averaged over heads (ToMe), or the class
#: token's attention to every token, averaged over heads (EViT).
METRICS = {"merge": "keys", "prune": "class_attention"}

#: ``(attention module, x, additive key bias or None, metric kind or None) -> (output, metric or None)``.
TokenAttention = Callable[[nn.Module, Tensor, "Tensor | None", "str | None"], tuple[Tensor, "Tensor | None"]]
_ATTENTIONS: dict[type[nn.Module], TokenAttention] = {}


def register_token_attention(attention_type: type[nn.Module], function: TokenAttention) -> None:
    """Make a reducing timm ``Block`` whose ``attn`` is exactly ``attention_type`` run ``function`` (the key bias and
    the metric of :func:`timm_attention`) instead of :func:`timm_attention`: how an export rewrite that replaces
    timm's ``Attention`` by a module of its own (onnxruntime's fusable form) keeps token reduction working."""
    if not (isinstance(attention_type, type) and issubclass(attention_type, nn.Module)):
        raise invalid("attention_type", attention_type, "an nn.Module subclass")
    if not callable(function):
        raise invalid("function", function, "a callable (module, x, bias, metric) -> (output, metric)")
    _ATTENTIONS[attention_type] = function


def size_bias(size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``log(size)`` of every key as an additive attention bias ``[B, 1, 1, N]`` (``None`` while no token merged:
    all sizes 1 add nothing)."""
    if size is None:
        return None
    return size.log().to(dtype).reshape(size.shape[0], 1, 1, size.shape[1])


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[B, N, heads * d]`` -> ``[B, heads, N, d]`` (d from the width: pruned attention works as is)."""
    b, n, width = t.shape
    return t.reshape(b, n, heads, width // heads).permute(0, 2, 1, 3)


def attend(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """``softmax(q * scale @ k^T + bias) @ v`` for ``[B, H, N, d]`` q/k/v (``[B, H, Nq, d]`` q), as ``module``
    computes it: SDPA when ``module.fused_attn``, else 3-D ``bmm`` (see the module docstring)."""
    dropout = module.attn_drop
    if getattr(module, "fused_attn", False):
        p = dropout.p if module.training else 0.0
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=module.scale)
    b, h, nq, d = q.shape
    n, dv = k.shape[2], v.shape[-1]
    q3 = (q * module.scale).reshape(b * h, nq, d)
    k3t = k.reshape(b * h, n, d).transpose(1, 2)
    v3 = v.reshape(b * h, n, dv)
    products = getattr(module, "products_dtype", torch.float32)
    if products != torch.float32 and q3.dtype == torch.float32:
        q3, k3t, v3 = q3.to(products), k3t.to(products), v3.to(products)
    logits = torch.bmm(q3, k3t)
    if bias is not None:
        logits = (logits.reshape(b, h, nq, n) + bias.to(logits.dtype)).reshape(b * h, nq, n)
    out = torch.bmm(dropout(logits.softmax(dim=-1)), v3).to(q.dtype)
    return out.reshape(b, h, nq, dv)


def _class_token_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """The class token's (index 0) attention to every token, averaged over heads: ``[B, N]``."""
    b, h, n, d = k.shape
    logits = torch.bmm((q[:, :, :1] * scale).reshape(b * h, 1, d), k.reshape(b * h, n, d).transpose(1, 2))
    logits = logits.reshape(b, h, 1, n)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def _metric(kind: str | None, q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor | None:
    if kind == "keys":
        return k.mean(dim=1)
    if kind == "class_attention":
        return _class_token_attention(q, k, scale, bias)
    return None


def timm_attention(attn: Attention, x: Tensor, bias: Tensor | None, metric: str | None) -> tuple[Tensor, Tensor | None]:
    """timm ``Attention`` (qk-norm, scale-norm and gated variants, pruned widths) with an additive key ``bias``;
    also returns ``metric`` (:data:`METRICS`; ``None``: nothing)."""
    b, n, _ = x.shape
    a, h = attn.attn_dim, attn.num_heads
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x)
    q = attn.q_norm(_heads(qkv[..., :a], h))
    k = attn.k_norm(_heads(qkv[..., a : 2 * a], h))
    v = _heads(qkv[..., 2 * a :], h)
    out = attend(attn, q, k, v, bias).permute(0, 2, 1, 3).reshape(b, n, a)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), _metric(metric, q, k, attn.scale, bias)


def talking_head_attention(
    attn: TalkingHeadAttn, x: Tensor, bias: Tensor | None, metric: str | None
) -> tuple[Tensor, Tensor | None]:
    """CaiT's talking-heads attention (pruned widths too) with an additive key ``bias`` after the pre-softmax head
    mixing (so it scales the attention a merged token gets), and ``metric``."""
    b, n, _ = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x)
    width = qkv.shape[-1] // 3
    q, k, v = _heads(qkv[..., :width], h), _heads(qkv[..., width : 2 * width], h), _heads(qkv[..., 2 * width :], h)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    weights = attn.proj_w(logits.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(b, n, width)
    return attn.proj_drop(attn.proj(out)), _metric(metric, q, k, attn.scale, bias)


def class_attention(attn: ClassAttn, u: Tensor, bias: Tensor | None) -> Tensor:
    """CaiT's class attention (the query of token 0 over all tokens of ``u``; pruned widths too) with a key bias."""
    b, h = u.shape[0], attn.num_heads
    q, k, v = _heads(attn.q(u[:, :1]), h), _heads(attn.k(u), h), _heads(attn.v(u), h)
    out = attend(attn, q, k, v, bias).transpose(1, 2).reshape(b, 1, -1)
    return attn.proj_drop(attn.proj(out))


def reduce_tokens(
    x: Tensor, size: Tensor | None, metric: Tensor, r: int, method: str, prefix: int, form: str = "gather"
) -> tuple[Tensor, Tensor | None]:
    """``x`` ``[B, N, C]`` with ``r`` tokens fewer (capped, :func:`~pqv_lightning.tokens.spec.capped_r`) and the
    sizes ``[B, N - r, 1]``. The first ``prefix`` tokens (class, distillation, register) are kept as they are.
    ``form`` (:data:`~pqv_lightning.tokens.spec.FORMS`): ``"gather"`` moves the tokens by index, ``"matrix"`` by one
    matrix product (:mod:`~pqv_lightning.tokens.slots`, the form XNNPACK delegates); the same function."""
    check_choice("form", form, FORMS)
    r = capped_r(r, x.shape[1] - prefix)
    if r == 0:
        return x, size
    if form == "matrix":
        out_tokens = x.shape[1] - r
        if method == "merge":
            slot = merge_slots(metric[:, prefix:], r, prefix)
            weight = 1.0 if size is None else size.reshape(x.shape[0], 1, x.shape[1])
            return reduce_by_slots(x, size, slot, weight, out_tokens, sizes_from_rows=True)
        slot, weight = prune_slots(metric[:, prefix:].reshape(x.shape[0], 1, -1), r, prefix)
        return reduce_by_slots(x, size, slot, weight, out_tokens, sizes_from_rows=False)
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    if method == "merge":
        return merge_wavg(x, size, bipartite_soft_matching(metric[:, prefix:], r), prefix)
    return fuse_inattentive(x, size, metric[:, prefix:], r, prefix)


def reducing_block(
    blk: nn.Module,
    x: Tensor,
    size: Tensor | None,
    r: int,
    method: str,
    prefix: int,
    proportional: bool,
    form: str = "gather",
) -> tuple[Tensor, Tensor | None]:
    """One self-attention block (timm ``Block`` or CaiT ``LayerScaleBlock``): attention (with ``log(size)`` on
    the logits when ``proportional``), residual, ``r`` tokens fewer (in ``form``, see :func:`reduce_tokens`), then
    the MLP residual."""
    reduce = capped_r(r, x.shape[1] - prefix) > 0
    metric = METRICS[method] if reduce else None
    bias = size_bias(size, x.dtype) if proportional else None
    if isinstance(blk, Block):
        attention = _ATTENTIONS.get(type(blk.attn), timm_attention)
        out, found = attention(blk.attn, blk.norm1(x), bias, metric)
        x = x + blk.drop_path1(blk.ls1(out))
        if reduce:
            x, size = reduce_tokens(x, size, found, r, method, prefix, form)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), size
    if isinstance(blk, LayerScaleBlock):
        out, found = talking_head_attention(blk.attn, blk.norm1(x), bias, metric)
        x = x + blk.drop_path(blk.gamma_1 * out)
        if reduce:
            x, size = reduce_tokens(x, size, found, r, method, prefix, form)
        return x + blk.drop_path(blk.gamma_2 * blk.mlp(blk.norm2(x))), size
    raise TypeError(f"{type(blk).__name__} is not a block token reduction knows (check_token_reduction refuses it)")


def class_attention_block(
    blk: LayerScaleBlockClassAttn, x: Tensor, x_cls: Tensor, size: Tensor | None, proportional: bool
) -> Tensor:
    """CaiT's class-attention block: the class token attends to itself and the (merged) patch tokens ``x``."""
    u = torch.cat((x_cls, x), dim=1)
    bias = None
    if proportional and size is not None:
        bias = size_bias(torch.cat([size.new_ones(size.shape[0], 1, 1), size], dim=1), u.dtype)
    x_cls = x_cls + blk.drop_path(blk.gamma_1 * class_attention(blk.attn, blk.norm1(u), bias))
    return x_cls + blk.drop_path(blk.gamma_2 * blk.mlp(blk.norm2(x_cls)))
