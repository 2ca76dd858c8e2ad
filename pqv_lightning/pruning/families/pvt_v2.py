"""PVTv2 (``pvt_v2_b*``): spatial-reduction attention and MLPs with a depthwise convolution.

The attention (``Attention``) projects queries with ``q`` (``[heads, head_dim]``) and keys and values of a
spatially reduced input with ``kv`` (``[2, heads, head_dim]``); the reduction (``sr`` convolution, or pooling in
the linear variant) works on the input width and is untouched. Pruned: head dims (q, k, v rows and ``proj``'s
columns), or whole heads (``prune_heads``), and the MLP hidden channels (``fc1``, the depthwise ``dwconv``,
``fc2``). Fixed afterwards: ``num_heads``, ``head_dim``, the trained scale folded into ``q`` and ``scale`` set to
the new default (fused == eager), and a forward that reshapes the output to the attention width (timm's uses the
input width ``C``). Stage widths are kept.
"""

from __future__ import annotations

import torch
from timm.models import pvt_v2

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import HEAD_DIM_ATTRS, Hidden, SeparateQKVAttention, attend, merge_heads

__all__ = ["PVTv2Family", "PrunedPVTAttention"]


class PrunedPVTAttention(pvt_v2.Attention):
    """PVTv2 attention whose output width is the (pruned) attention width."""

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        if self.pool is not None or self.sr is not None:
            x = x.permute(0, 2, 1).reshape(b, c, *feat_size)
            x = self.sr(self.pool(x) if self.pool is not None else x).reshape(b, c, -1).permute(0, 2, 1)
            x = self.norm(x)
            if self.act is not None:
                x = self.act(x)
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj_drop(self.proj(merge_heads(attend(self, q, k, v))))


class PVTv2Family(BlockFamily):
    name = "pvt_v2"
    description = "timm PyramidVisionTransformerV2: pvt_v2_* (MLP hidden, head dims or heads)"
    model_type = pvt_v2.PyramidVisionTransformerV2
    blocks = (
        Hidden("pvt_v2_mlp", (pvt_v2.MlpWithDepthwiseConv,), ("fc1",), "fc2", through=("dwconv",)),
        SeparateQKVAttention(
            "pvt_v2_attention",
            (pvt_v2.Attention,),
            paths=("q", "kv", "kv"),
            attrs=HEAD_DIM_ATTRS,
            forward_class=PrunedPVTAttention,
        ),
    )
