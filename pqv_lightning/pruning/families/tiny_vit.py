"""TinyViT (``tiny_vit_*``): a convolutional first stage (MBConv) and windowed LeViT-style attention.

The attention (``Attention``) splits qkv per head into ``[q, k, v]`` and adds learned attention biases; unlike
LeViT it has a fused path (``scaled_dot_product_attention`` with the biases as mask, default scale from the key
dim). Pruned: key dims, value dims or whole heads (with their attention-bias rows), the MLP hidden channels
(``NormMlp``), and the MBConv / patch-merging expansions (1x1, depthwise, 1x1). Fixed afterwards: ``num_heads``,
``key_dim``, ``val_dim``, ``out_dim``; after key-dim pruning the trained scale is folded into the q rows and
``scale`` set to the new key dim's default, so fused and eager agree. Stage widths are kept.
"""

from __future__ import annotations

from timm.models import tiny_vit as tv

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import Hidden, InterleavedAttention

__all__ = ["TinyViTFamily"]


class TinyViTFamily(BlockFamily):
    name = "tiny_vit"
    description = "timm TinyVit: tiny_vit_* (MLP hidden, key/value dims or heads, MBConv expansions)"
    model_type = tv.TinyVit
    blocks = (
        Hidden("tiny_vit_mlp", (tv.NormMlp,), ("fc1",), "fc2"),
        Hidden(
            "tiny_vit_mbconv",
            (tv.MBConv, tv.PatchMerging),
            ("conv1",),
            "conv3",
            through=("conv2",),
            what="MBConv / patch-merging expansions",
        ),
        InterleavedAttention(
            "tiny_vit_attention",
            (tv.Attention,),
            attrs={"num_heads": "h", "key_dim": "kd", "val_dim": "vd", "out_dim": "hvd"},
        ),
    )
