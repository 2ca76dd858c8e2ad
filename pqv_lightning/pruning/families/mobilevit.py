"""MobileViT (``mobilevit_*``) and MobileViTV2 (``mobilevitv2_*``), timm ``ByobNet`` models with MobileViT blocks.

MobileViT runs timm ViT blocks (``timm.layers.Attention``, ``Mlp``) on unfolded patches; MobileViTV2 runs separable
linear attention (``LinearSelfAttention``: one context score per token, ``out = relu(v) * sum(k * softmax(q))``) with
1x1-convolution MLPs. Both have inverted-bottleneck convolution blocks (``BottleneckBlock``: 1x1 expand, depthwise
kxk, 1x1 project). Pruned: MLP hidden channels, attention head dims (MobileViT; heads with ``prune_heads``), the
linear-attention width (MobileViTV2: channel ``j`` of k and v together, ``embed_dim`` set to the new width) and the
bottleneck expansions and the final 1x1 convolution's channels (read by the classifier after pooling). The
transformer widths between the 1x1 convolutions (``conv_1x1``/``conv_proj``) are kept.
"""

from __future__ import annotations

import torch.nn as nn
from timm.models.byobnet import BottleneckBlock, ByobNet
from timm.models.mobilevit import LinearSelfAttention, MobileVitBlock, MobileVitV2Block

from pqv_lightning.pruning.couplings import Coupling, channels, cols, rows
from pqv_lightning.pruning.families.base import BlockFamily, DimsBlock
from pqv_lightning.pruning.families.layers import ATTENTION, MLPS, Hidden, join
from pqv_lightning.pruning.spec import PruningSpec

__all__ = ["BOTTLENECK", "FINAL_CONV", "MobileViTFamily", "MobileViTV2Family"]

#: byobnet's inverted bottleneck with a depthwise middle convolution (no SE, no second kxk convolution).
BOTTLENECK = Hidden(
    "bottleneck",
    (BottleneckBlock,),
    ("conv1_1x1",),
    "conv3_1x1",
    through=("conv2_kxk",),
    what="bottleneck expansion channels",
    absent=("conv2b_kxk", "attn"),
)


#: The last 1x1 convolution before pooling, read by the classifier.
FINAL_CONV = Hidden("final_conv", (ByobNet,), ("final_conv",), "head.fc", what="final convolution channels")


class LinearAttention(DimsBlock):
    """MobileViTV2's separable attention: channel ``j`` of key and value (qkv rows ``1 + j`` and ``1 + E + j``) and
    column ``j`` of ``out_proj``; the one query row is kept. ``embed_dim`` (its split size) is set afterwards."""

    name = "linear_attention"
    types = (LinearSelfAttention,)
    what = "linear-attention channels"

    def dim_couplings(self, name: str, module: nn.Module) -> list[Coupling]:
        e = module.embed_dim
        members = [
            cols(join(name, "out_proj"), channels(e)),
            rows(join(name, "qkv_proj"), channels(e, offset=1, repeat=2, repeat_stride=e)),
        ]
        return [Coupling(f"{name} (attention channels)", "LinearSelfAttention.channels", e, members, gate=0)]

    def state(self, module: nn.Module, spec: PruningSpec, before: object) -> dict:
        return {"embed_dim": int(module.out_proj.in_channels)}

    def restore(self, module: nn.Module, state: dict) -> None:
        module.embed_dim = int(state["embed_dim"])


class _MobileViT(BlockFamily):
    model_type = ByobNet
    block_type: type = nn.Module

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ByobNet) and any(isinstance(m, self.block_type) for m in model.modules())


class MobileViTFamily(_MobileViT):
    name = "mobilevit"
    description = "timm ByobNet with MobileVitBlock: mobilevit_* (MLP hidden, head dims or heads, bottlenecks)"
    block_type = MobileVitBlock
    blocks = (*MLPS, *ATTENTION, BOTTLENECK, FINAL_CONV)


class MobileViTV2Family(_MobileViT):
    name = "mobilevitv2"
    description = "timm ByobNet with MobileVitV2Block: mobilevitv2_* (MLP hidden, linear attention, bottlenecks)"
    block_type = MobileVitV2Block
    blocks = (*MLPS, LinearAttention(), BOTTLENECK, FINAL_CONV)
