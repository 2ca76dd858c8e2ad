"""ConViT (``convit_*``): gated positional self-attention (GPSA) blocks, then plain multi-head attention (MHSA).

``GPSA`` mixes content attention (``qk``: ``[2, heads, head_dim]``) with a positional attention computed by
``pos_proj`` (one output per head) from fixed relative indices, gated per head (``gating_param``); ``v`` is a layer
of its own. ``MHSA`` is plain ``[3, heads, head_dim]`` attention. Both are eager only (``* scale``) and reshape with
``C // num_heads``. Pruned: MLP hidden channels; key dims and value dims (GPSA), head dims (MHSA), or whole heads
(also GPSA's ``pos_proj`` rows and gates). Fixed afterwards: ``num_heads``, and forwards that reshape with the
attention width; the trained ``scale`` is kept. The embedding width is kept.
"""

from __future__ import annotations

import torch
from timm.models import convit

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import (
    MLPS,
    FusedQKVAttention,
    SeparateQKVAttention,
    merge_heads,
    split_heads,
)

__all__ = ["ConViTFamily", "PrunedGPSA", "PrunedMHSA"]


class PrunedGPSA(convit.GPSA):
    """GPSA reshaped with the (pruned) key and value widths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.rel_indices is None or self.rel_indices.shape[1] != n:
            self.rel_indices = self.get_rel_indices(n)
        attn = self.get_attention(x)
        v = self.v(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        return self.proj_drop(self.proj(merge_heads(attn @ v)))

    def get_attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k = split_heads(self.qk(x), self.num_heads, parts=2)
        pos_score = self.pos_proj(self.rel_indices.expand(x.shape[0], -1, -1, -1)).permute(0, 3, 1, 2)
        patch_score = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        gating = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        return self.attn_drop(self.renormalise((1.0 - gating) * patch_score + gating * pos_score.softmax(dim=-1)))

    @staticmethod
    def renormalise(attn: torch.Tensor) -> torch.Tensor:
        return attn / attn.sum(dim=-1).unsqueeze(-1)


class PrunedMHSA(convit.MHSA):
    """ConViT's MHSA reshaped with the (pruned) head dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


class ConViTFamily(BlockFamily):
    name = "convit"
    description = "timm ConVit: convit_* (MLP hidden, GPSA key/value dims, MHSA head dims, or heads)"
    model_type = convit.ConVit
    blocks = (
        *MLPS,
        SeparateQKVAttention(
            "gpsa",
            (convit.GPSA,),
            paths=("qk", "qk", "v"),
            joint=False,
            tables=(("pos_proj", "rows"), ("gating_param", 0)),
            forward_class=PrunedGPSA,
        ),
        FusedQKVAttention("mhsa", (convit.MHSA,), forward_class=PrunedMHSA),
    )
