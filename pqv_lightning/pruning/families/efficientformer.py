"""EfficientFormer (``efficientformer_l*``) and EfficientFormerV2 (``efficientformerv2_*``).

EfficientFormer: pooling token mixers with 1x1-convolution MLPs (``ConvMlpWithNorm``: conv, BatchNorm, GELU,
conv), and in the last stage one ViT-like block whose attention (``Attention``) splits qkv per head into ``[q, k,
v]`` (key dim 32, value dim 4 x 32) with learned attention biases. EfficientFormerV2: every block is convolutional
(BatchNorm everywhere); its attention (``Attention2d``, ``Attention2dDownsample``) has separate q, k, v
convolutions, a depthwise ``v_local`` on the values and, in ``Attention2d``, two talking-head 1x1 convolutions
across heads. Pruned: MLP hidden channels (with the depthwise middle convolution in V2), key dims (q and k), value
dims (v, ``v_local`` and the output projection's input), or whole heads (``prune_heads``: also their attention-bias
rows and talking-head rows and columns). Fixed afterwards: ``num_heads``, ``key_dim`` and the value dims
(``val_dim``/``val_attn_dim``/``key_attn_dim``; V2: ``d``/``dh``); both have only the eager path, so the trained
``scale`` is kept. Stage widths are kept.
"""

from __future__ import annotations

from timm.models import efficientformer as ef
from timm.models import efficientformer_v2 as ef2

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import MLPS, Hidden, InterleavedAttention, SeparateQKVAttention

__all__ = ["EfficientFormerFamily", "EfficientFormerV2Family"]

_V2 = {
    "joint": False,
    "attrs": {"num_heads": "h", "key_dim": "kd", "d": "vd", "dh": "hvd"},
    "value_paths": ("v_local",),
    "tables": (("attention_biases", 0), ("talking_head1", "rows+cols"), ("talking_head2", "rows+cols")),
}


class EfficientFormerFamily(BlockFamily):
    name = "efficientformer"
    description = "timm EfficientFormer: efficientformer_l* (MLP hidden, key/value dims or heads)"
    model_type = ef.EfficientFormer
    blocks = (
        *MLPS,
        Hidden("efficientformer_conv_mlp", (ef.ConvMlpWithNorm,), ("fc1",), "fc2", through=("norm1",)),
        InterleavedAttention("efficientformer_attention", (ef.Attention,)),
    )


class EfficientFormerV2Family(BlockFamily):
    name = "efficientformerv2"
    description = "timm EfficientFormerV2: efficientformerv2_* (MLP hidden, key/value dims or heads)"
    model_type = ef2.EfficientFormerV2
    blocks = (
        Hidden("efficientformerv2_conv_mlp", (ef2.ConvMlpWithNorm,), ("fc1",), "fc2.conv", through=("mid",)),
        SeparateQKVAttention("efficientformerv2_attention", (ef2.Attention2d,), **_V2),
        SeparateQKVAttention(
            "efficientformerv2_attention_downsample", (ef2.Attention2dDownsample,), paths=("q.proj", "k", "v"), **_V2
        ),
    )
