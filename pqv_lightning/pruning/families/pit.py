"""PiT (``pit_*``): pooling-based ViT, timm ``Block`` (``timm.layers.Attention`` + ``Mlp``) in every stage.

Pruned: MLP hidden channels and head dims (or whole heads), with the same fixes as plain ViT attention
(``num_heads``/``head_dim``/``attn_dim``, the trained scale folded into the q rows so fused == eager). The stage
widths, changed by the depthwise pooling convolutions between stages, are kept.
"""

from __future__ import annotations

from timm.models import pit

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import ATTENTION, MLPS

__all__ = ["PiTFamily"]


class PiTFamily(BlockFamily):
    name = "pit"
    description = "timm PoolingVisionTransformer: pit_* (MLP hidden, head dims or heads)"
    model_type = pit.PoolingVisionTransformer
    blocks = (*MLPS, *ATTENTION)
