"""CaiT (``cait_*``): talking-heads self-attention with layer scale, then class-attention blocks.

``TalkingHeadAttn``: a ``[3, heads, head_dim]`` qkv layer and two head-mixing linear layers (``proj_l`` before,
``proj_w`` after the softmax), eager only (``q * scale``). ``ClassAttn`` (also XCiT's): separate ``q``/``k``/``v``
layers, the class token's query only, a fused and an eager path. Pruned: MLP hidden channels; head dims
(TalkingHeadAttn: q, k, v together; ClassAttn: key dims and value dims apart), or whole heads (also the rows and
columns of ``proj_l``/``proj_w``). Fixed afterwards: ``num_heads``; ClassAttn's trained scale folded into ``q``
with ``scale`` set to the new default (fused == eager), TalkingHeadAttn's kept; forwards that reshape with the
attention width (timm's use ``C // num_heads`` and ``C``). The embedding width and layer scales are kept.
"""

from __future__ import annotations

import torch
from timm.models import cait

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import (
    MLPS,
    FusedQKVAttention,
    SeparateQKVAttention,
    attend,
    merge_heads,
    split_heads,
)

__all__ = ["CLASS_ATTENTION", "CaiTFamily", "PrunedClassAttn", "PrunedTalkingHeadAttn"]


class PrunedTalkingHeadAttn(cait.TalkingHeadAttn):
    """Talking-heads attention reshaped with the (pruned) attention width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        attn = self.proj_l(((q * self.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(self.proj_w(attn.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


class PrunedClassAttn(cait.ClassAttn):
    """Class attention reshaped with the (pruned) key and value widths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x[:, 0]).reshape(b, 1, self.num_heads, -1).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        return self.proj_drop(self.proj(merge_heads(attend(self, q, k, v))))


#: CaiT's class attention, shared with XCiT: separate q, k, v layers, key and value dims pruned apart.
CLASS_ATTENTION = SeparateQKVAttention("class_attention", (cait.ClassAttn,), joint=False, forward_class=PrunedClassAttn)


class CaiTFamily(BlockFamily):
    name = "cait"
    description = "timm Cait: cait_* (MLP hidden, head dims or heads)"
    model_type = cait.Cait
    blocks = (
        *MLPS,
        FusedQKVAttention(
            "talking_head_attention",
            (cait.TalkingHeadAttn,),
            tables=(("proj_l", "rows+cols"), ("proj_w", "rows+cols")),
            forward_class=PrunedTalkingHeadAttn,
        ),
        CLASS_ATTENTION,
    )
