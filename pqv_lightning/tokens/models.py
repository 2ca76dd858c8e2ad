"""The reduced models: timm's ``VisionTransformer``, ``VisionTransformerDistilled`` and ``Cait`` whose forward
carries the token sizes through the blocks and pools with them.

:func:`pqv_lightning.tokens.apply_token_reduction` swaps a model's class for one of these (same modules, same
parameters, same ``state_dict`` keys); the settings live on the model as plain data (``pqv_token_reduction``: the
spec's dict and ``pqv_token_r``: ``r`` of each block), read at every forward. Blocks, attention modules and every
other submodule keep their classes, so pruning (which recognises blocks by their exact type), quantization and the
export rewrites see the model they know.

Pooling: class-token pooling is unchanged; ``global_pool="avg"`` becomes the size-weighted mean over the tokens,
which is the mean over the original patch tokens (exactly the timm pooling while nothing is merged). Other pools
are refused by :func:`pqv_lightning.tokens.check_token_reduction`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.cait import Cait
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pqv_lightning.tokens.blocks import class_attention_block, reducing_block

__all__ = [
    "FORM_ATTRIBUTE",
    "REDUCED_CLASSES",
    "SCHEDULE_ATTRIBUTE",
    "SETTINGS_ATTRIBUTE",
    "ReducedCait",
    "ReducedVisionTransformer",
    "ReducedVisionTransformerDistilled",
    "weighted_mean",
]

#: Model attribute holding the spec as plain data (``TokenReduction.as_dict()``).
SETTINGS_ATTRIBUTE = "pqv_token_reduction"
#: Model attribute holding ``r`` of each reducing block (a tuple of ints).
SCHEDULE_ATTRIBUTE = "pqv_token_r"
#: Model attribute naming how the blocks move tokens (:data:`~pqv_lightning.tokens.spec.FORMS`; absent: gather).
FORM_ATTRIBUTE = "pqv_token_form"


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """The mean of ``x`` ``[B, N, C]`` over tokens weighted by ``size`` ``[B, N, 1]``: the mean over the original
    tokens. Written with means (what XNNPACK delegates after the project's static-reshape pass), not sums."""
    return (x * size).mean(dim=1) / size.mean(dim=1)


def _run_blocks(model: Any, blocks: Any, x: Tensor, prefix: int) -> tuple[Tensor, Tensor | None]:
    settings = getattr(model, SETTINGS_ATTRIBUTE)
    method, proportional = settings["method"], bool(settings["proportional_attention"])
    form = getattr(model, FORM_ATTRIBUTE, "gather")
    size = None
    for blk, r in zip(blocks, getattr(model, SCHEDULE_ATTRIBUTE), strict=True):
        if model.grad_checkpointing and model.training and not torch.jit.is_scripting():
            x, size = checkpoint(
                reducing_block, blk, x, size, r, method, prefix, proportional, form, use_reentrant=False
            )
        else:
            x, size = reducing_block(blk, x, size, r, method, prefix, proportional, form)
    return x, size


def _no_mask(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(
            "A token-reduced model takes no attention mask (attn_mask / is_causal): its token count changes "
            "from block to block."
        )


class ReducedVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with token reduction in every block (see the module docstring)."""

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features after the final norm and the token sizes ``[B, N, 1]`` (``None`` when nothing was reduced)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, size = _run_blocks(self, self.blocks, x, self.num_prefix_tokens)
        return self.norm(x), size

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        return self.forward_tokens(x)[0]

    def pool(self, x: Tensor, pool_type: str | None = None, size: Tensor | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if size is None or pool_type != "avg" or self.attn_pool is not None:
            return super().pool(x, pool_type)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        return weighted_mean(x, size)

    def forward_head(self, x: Tensor, pre_logits: bool = False, size: Tensor | None = None) -> Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x, size=size)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _no_mask(attn_mask, is_causal)
        x, size = self.forward_tokens(x)
        return self.forward_head(x, size=size)


class ReducedVisionTransformerDistilled(VisionTransformerDistilled):
    """DeiT distilled (class and distillation tokens, both kept out of the reduction) with token reduction."""

    forward_tokens = ReducedVisionTransformer.forward_tokens
    forward_features = ReducedVisionTransformer.forward_features

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) * 0.5
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        # ``* 0.5`` (exactly ``/ 2``): an int divisor lowers to a cast XNNPACK does not take
        return (x + x_dist) * 0.5

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Any:
        _no_mask(attn_mask, is_causal)
        return self.forward_head(self.forward_tokens(x)[0])


class ReducedCait(Cait):
    """CaiT with token merging in its self-attention blocks (patch tokens only; the class token joins in the
    class-attention blocks, which attend to the merged tokens with ``log(size)`` when proportional)."""

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class token and patch tokens after the final norm, and the sizes of all of them (class token: 1)."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        x, size = _run_blocks(self, self.blocks, x, 0)
        if self.blocks_token_only is not None:
            proportional = bool(getattr(self, SETTINGS_ATTRIBUTE)["proportional_attention"])
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            for blk in self.blocks_token_only:
                cls = class_attention_block(blk, x, cls, size, proportional)
            x = torch.cat((cls, x), dim=1)
            if size is not None:
                size = torch.cat([size.new_ones(size.shape[0], 1, 1), size], dim=1)
        return self.norm(x), size

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False, size: Tensor | None = None) -> Tensor:
        if self.global_pool == "avg" and size is not None:
            p = self.num_prefix_tokens
            x = weighted_mean(x[:, p:], size[:, p:])
        elif self.global_pool:
            x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x, size = self.forward_tokens(x)
        return self.forward_head(x, size=size)


#: timm model class -> its reduced class (exact types: a subclass may change what the forward does).
REDUCED_CLASSES = {
    VisionTransformer: ReducedVisionTransformer,
    VisionTransformerDistilled: ReducedVisionTransformerDistilled,
    Cait: ReducedCait,
}
