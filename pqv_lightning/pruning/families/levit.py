"""LeViT (``levit_*``, ``levit_conv_*``): attention with per-head interleaved qkv and learned attention biases.

Every projection is a ``LinearNorm`` (linear + BatchNorm, or ``ConvNorm``); the attention splits one qkv output
per head into ``[q, k, v]`` (key dim ``kd``, value dim ``vd = attn_ratio * kd``), which torch-pruning cannot trace
(an IndexError in its pruner). Pruned: key dims (q and k rows of every head, with their BatchNorm channels), value
dims (v rows and the output projection's columns), or whole heads (``prune_heads``: also the head's row of
``attention_biases``), and the MLP hidden channels. Fixed afterwards: ``key_dim``, ``val_dim``, ``key_attn_dim``,
``val_attn_dim``, ``num_heads``; the trained ``scale`` is kept (LeViT has only the eager path). Stage widths
(the residual stream, the attention-downsample outputs) are kept.
"""

from __future__ import annotations

from timm.models import levit

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import Hidden, InterleavedAttention

__all__ = ["LeViTFamily"]


class LeViTFamily(BlockFamily):
    name = "levit"
    description = "timm Levit: levit_* (MLP hidden, key/value dims or heads)"
    model_type = levit.Levit
    blocks = (
        Hidden("levit_mlp", (levit.LevitMlp,), ("ln1",), "ln2"),
        InterleavedAttention("levit_attention", (levit.Attention,), proj="proj.ln"),
        # queries from a strided ``q`` layer, ``[k, v]`` per head from ``kv``
        InterleavedAttention(
            "levit_attention_downsample", (levit.AttentionDownsample,), qkv="kv", q="q.ln", proj="proj.ln"
        ),
    )
