"""FastViT (``fastvit_*``): RepMixer and attention blocks with 1x1-convolution MLPs.

RepMixer token mixers are depthwise (reparameterisable) convolutions on the stage width and are kept, like the
MobileOne patch embeddings. Pruned: the MLP hidden channels (``ConvMlp``: depthwise 7x7 on the input, then
``fc1``/``fc2``), and in the attention blocks of the ``sa``/``ma`` variants the head dims or whole heads
(``Attention``: ``[3, heads, head_dim]`` qkv on flattened tokens). Fixed afterwards: ``num_heads``, ``head_dim``,
the trained scale folded into the q rows and ``scale`` set to the new default (fused == eager), and a forward
that reshapes the attention output to the attention width (timm's uses the input width ``C``). Stage widths are
kept, so ``reparameterize()`` works on a pruned model as on a dense one.
"""

from __future__ import annotations

import torch
from timm.models import fastvit

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import (
    HEAD_DIM_ATTRS,
    FusedQKVAttention,
    Hidden,
    attend,
    merge_heads,
    split_heads,
)

__all__ = ["FastViTFamily", "PrunedFastViTAttention"]


class PrunedFastViTAttention(fastvit.Attention):
    """FastViT attention whose tokens are reshaped with the (pruned) attention width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = split_heads(self.qkv(x.flatten(2).transpose(-2, -1)), self.num_heads)
        x = self.proj_drop(self.proj(merge_heads(attend(self, q, k, v))))
        return x.transpose(-2, -1).reshape(b, c, h, w)


class FastViTFamily(BlockFamily):
    name = "fastvit"
    description = "timm FastVit: fastvit_* (MLP hidden; head dims or heads in attention stages)"
    model_type = fastvit.FastVit
    blocks = (
        Hidden("fastvit_mlp", (fastvit.ConvMlp,), ("fc1",), "fc2"),
        FusedQKVAttention(
            "fastvit_attention",
            (fastvit.Attention,),
            attrs=HEAD_DIM_ATTRS,
            forward_class=PrunedFastViTAttention,
        ),
    )
