"""BEiT (``beit_*``, ``beitv2_*``): ViT blocks with per-block relative position biases and layer scale.

The attention (``beit.Attention``) has a bias-free ``[3, heads, head_dim]`` qkv layer with ``q_bias``/``v_bias``
parameters and a zero ``k_bias`` buffer, and a relative-position bias table ``[num_relative_distance, heads]`` per
block (indexed by a fixed buffer), added in both the fused and the eager path. Pruned: head dims (q, k, v rows,
their biases, ``proj``'s columns) or whole heads (also their bias-table column), and the MLP hidden channels (Mlp or
SwiGLU). Fixed afterwards: ``num_heads``, ``k_bias`` resized, the trained scale folded into the q rows and q bias
with ``scale`` set to the new default (fused == eager), and a forward that reshapes the output to the attention
width (timm's uses the input width ``C``). A model with the *shared* relative position bias (one table for all
blocks) cannot lose heads block by block: ``prune_heads`` is refused for it. The embedding width and layer scales
(``gamma_1``/``gamma_2``) are kept.
"""

from __future__ import annotations

import torch
from timm.models import beit

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import (
    MLPS,
    FusedQKVAttention,
    attend,
    merge_heads,
    qkv_with_biases,
    split_heads,
)
from pqv_lightning.pruning.spec import PruningSpec, unsupported

__all__ = ["BEiTFamily", "PrunedBeitAttention"]


class PrunedBeitAttention(beit.Attention):
    """BEiT attention whose output width is the (pruned) attention width."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = split_heads(qkv_with_biases(self, x), self.num_heads)
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return self.proj_drop(self.proj(merge_heads(attend(self, q, k, v, bias))))


class BEiTFamily(BlockFamily):
    name = "beit"
    description = "timm Beit: beit_*, beitv2_* (MLP hidden, head dims or heads)"
    model_type = beit.Beit
    blocks = (
        *MLPS,
        FusedQKVAttention(
            "beit_attention",
            (beit.Attention,),
            qkv_biases=True,
            tables=(("relative_position_bias_table", 1),),
            forward_class=PrunedBeitAttention,
        ),
    )

    def check(self, model, spec: PruningSpec | None) -> None:
        super().check(model, spec)
        if spec is not None and spec.prune_heads and model.rel_pos_bias is not None:
            raise unsupported(
                "prune_heads",
                True,
                f"prune_heads=False for {self.name} with a shared relative position bias "
                "(use_shared_rel_pos_bias=True: one table for every block, so every block must keep its heads)",
            )
