"""EfficientViT, MIT (``efficientvit_b*``, ``efficientvit_l*``) and Microsoft (``efficientvit_m*``).

MIT: MBConv / fused-MBConv expansions, the classifier head's hidden widths and ``LiteMLA``, multi-scale linear
attention: one 1x1 qkv convolution laid out per head as ``[q, k, v]`` (``dim`` each), multi-scale aggregation
branches (a depthwise convolution, then a 1x1 convolution grouped per q/k/v of each head) and a ReLU-kernel linear
attention whose outputs (one per head and branch) the projection reads. Channel ``j`` of a head dim is q, k and v
channel ``j`` of every head, in ``qkv``, in both aggregation convolutions and in every branch's projection input;
``dim`` (the reshape size) is set afterwards. torch-pruning fails on this block (an IndexError in its pruner).

Microsoft: ``ConvMlp`` expansions and ``CascadedGroupAttention``: one qkv ConvNorm per head (on a slice of the
input, cascaded: each head's output is added to the next head's input slice), ``[q, k, v]`` (key dim, key dim,
value dim = the slice width), a depthwise convolution on q, and a projection over the concatenated head outputs;
the graph tracer did not finish on it. Key dims (q, k and the depthwise q convolution of every head, the same count
in every head) are pruned and ``key_dim`` set afterwards; the trained ``scale`` is kept (eager only). Value dims
and heads are kept: the cascade adds a head's values to the next head's input slice. Stage widths are kept in
both.
"""

from __future__ import annotations

import torch.nn as nn
from timm.models import efficientvit_mit as mit
from timm.models import efficientvit_msra as msra

from pqv_lightning.pruning.couplings import Coupling, channels, cols, rows
from pqv_lightning.pruning.families.base import Block, BlockFamily, DimsBlock
from pqv_lightning.pruning.families.layers import Hidden, join
from pqv_lightning.pruning.spec import PruningSpec

__all__ = ["EfficientViTMITFamily", "EfficientViTMSRAFamily"]


class LiteMLA(DimsBlock):
    """Positions ``(head, q|k|v, j)``: groups ``3 * heads`` of width ``dim``."""

    name = "lite_mla"
    types = (mit.LiteMLA,)
    what = "head dims (heads kept)"

    def dim_couplings(self, name: str, module: nn.Module) -> list[Coupling]:
        d = module.dim
        total = module.qkv.conv.out_channels // 3
        heads, branches = total // d, 1 + len(module.aggreg)
        qkv = channels(d, 3 * heads)
        members = [rows(join(name, "qkv.conv"), qkv)]
        members += [rows(join(name, "qkv.norm"), qkv)] if isinstance(module.qkv.norm, nn.BatchNorm2d) else []
        for i in range(len(module.aggreg)):
            members += [
                rows(join(name, f"aggreg.{i}.0"), qkv),
                rows(join(name, f"aggreg.{i}.1"), qkv),
                cols(join(name, f"aggreg.{i}.1"), qkv),
            ]
        proj = tuple(
            tuple(b * total + head * d + j for b in range(branches))
            for head in range(heads)
            for _ in range(3)
            for j in range(d)
        )
        members.append(cols(join(name, "proj.conv"), proj))
        return [
            Coupling(f"{name} (head dims)", "LiteMLA.head_dims", d, members, groups=3 * heads, gate=len(members) - 1)
        ]

    def before(self, module: nn.Module) -> int:
        return module.qkv.conv.out_channels // (3 * module.dim)  # heads

    def state(self, module: nn.Module, spec: PruningSpec, before: int) -> dict:
        return {"dim": module.qkv.conv.out_channels // (3 * before)}

    def restore(self, module: nn.Module, state: dict) -> None:
        module.dim = int(state["dim"])


def _in_group(g: int, groups: int, chans: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """``chans`` (one group's positions) at group ``g`` of ``groups``, nothing at the others'."""
    width = len(chans)
    return tuple(chans[p - g * width] if g * width <= p < (g + 1) * width else () for p in range(groups * width))


class CascadedGroupAttention(DimsBlock):
    name = "cascaded_group_attention"
    types = (msra.CascadedGroupAttention,)
    what = "key dims (heads and value dims kept)"

    def dim_couplings(self, name: str, module: nn.Module) -> list[Coupling]:
        h, kd = module.num_heads, module.key_dim
        keys = []
        for g in range(h):
            for path, offset in ((f"qkvs.{g}", 0), (f"qkvs.{g}", kd), (f"dws.{g}", 0)):
                chans = _in_group(g, h, channels(kd, offset=offset))
                keys += [rows(join(name, f"{path}.{part}"), chans) for part in ("conv", "bn")]
        return [Coupling(f"{name} (key dims)", "CascadedGroupAttention.key_dims", kd, keys, groups=h)]

    def state(self, module: nn.Module, spec: PruningSpec, before: object) -> dict:
        return {"key_dim": (module.qkvs[0].conv.out_channels - module.val_dim) // 2}

    def restore(self, module: nn.Module, state: dict) -> None:
        module.key_dim = int(state["key_dim"])
        module.attention_bias_cache = {}


class ClassifierHead(Block):
    """The MIT head's hidden widths: the 1x1 ``in_conv`` (read by ``classifier.0`` after pooling) and
    ``classifier.0``'s outputs (with their LayerNorm, read by the final linear layer)."""

    name = "efficientvit_head"
    types = (mit.ClassifierHead,)
    what = "classifier-head hidden channels"
    parts = (
        Hidden("head_in_conv", (), ("in_conv",), "classifier.0"),
        Hidden("head_hidden", (), ("classifier.0",), "classifier.4", through=("classifier.1",)),
    )

    def couplings(self, name: str, module: nn.Module, spec: PruningSpec) -> list[Coupling]:
        if len(module.classifier) != 5:
            return []
        return [c for part in self.parts for c in part.couplings(name, module, spec)]


class EfficientViTMITFamily(BlockFamily):
    name = "efficientvit_mit"
    description = "timm EfficientVit (MIT): efficientvit_b*/l* (MBConv expansions, LiteMLA head dims, head widths)"
    model_type = mit.EfficientVit
    blocks = (
        Hidden(
            "mbconv", (mit.MBConv,), ("inverted_conv",), "point_conv", through=("depth_conv",), what="MBConv expansions"
        ),
        Hidden("fused_mbconv", (mit.FusedMBConv,), ("spatial_conv",), "point_conv", what="fused-MBConv expansions"),
        LiteMLA(),
        ClassifierHead(),
    )


class EfficientViTMSRAFamily(BlockFamily):
    name = "efficientvit_msra"
    description = "timm EfficientVitMsra (Microsoft): efficientvit_m* (ConvMlp expansions, cascaded-attention key dims)"
    model_type = msra.EfficientVitMsra
    blocks = (
        Hidden("msra_conv_mlp", (msra.ConvMlp,), ("pw1",), "pw2", what="FFN expansions"),
        CascadedGroupAttention(),
    )
