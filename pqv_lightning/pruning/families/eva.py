"""EVA / EVA-02 (``eva02_*``, ``eva_*``): ViT blocks with rotary position embeddings and SwiGLU MLPs.

The attention (``EvaAttention``) has a fused qkv layer (with ``q_bias``/``v_bias`` parameters and a zero
``k_bias`` buffer) or separate ``q_proj``/``k_proj``/``v_proj``, optional q/k norms over the head dim, an optional
output norm over the attention width and an optional output gate. RoPE rotates pairs of head dims with one table
shared by all blocks (``model.rope``), so head dims are kept: ``prune_heads=True`` removes whole heads (q, k, v
rows, biases, the output norm's and gate's channels, ``proj``'s columns), a head dim change would need every
block's rotary table cut alike. Pruned by default: the MLP hidden channels (SwiGLU ``fc1_g``/``fc1_x``, its norm,
``fc2``; or GluMlp / Mlp). Fixed afterwards: ``num_heads``, ``k_bias`` resized, and a forward that reshapes the
output to the attention width (timm's uses the input width ``C``); the scale does not change (head dims kept).
"""

from __future__ import annotations

import torch
from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models import eva

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import (
    MLPS,
    FusedQKVAttention,
    HeadAttention,
    Proj,
    merge_heads,
    qkv_with_biases,
    split_heads,
)

__all__ = ["EVAFamily", "PrunedEvaAttention"]


class PrunedEvaAttention(eva.EvaAttention):
    """EVA attention whose output width is the (pruned) attention width."""

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        n = x.shape[1]
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = split_heads(qkv_with_biases(self, x), self.num_heads)
        else:
            q, k, v = (split_heads(p(x), self.num_heads, parts=1)[0] for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.rotate(q, rope).type_as(v), self.rotate(k, rope).type_as(v)
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            x = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(n, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(merge_heads(x))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE on the patch tokens (the prefix tokens are not rotated)."""
        npt = self.num_prefix_tokens
        half = getattr(self, "rotate_half", False)
        return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)


class EvaAttention(FusedQKVAttention):
    """A fused qkv layer (with block-held q/v biases) or separate ``q_proj``/``k_proj``/``v_proj``."""

    def dims(self, module):
        return HeadAttention.dims(self, module)

    def projections(self, module):
        if module.qkv is not None:
            return super().projections(module)
        return {w: [Proj(f"{w}_proj", 0, module.head_dim)] for w in "qkv"}


class EVAFamily(BlockFamily):
    name = "eva"
    description = "timm Eva: eva02_*, eva_* (MLP hidden; heads with prune_heads)"
    model_type = eva.Eva
    blocks = (
        *MLPS,
        EvaAttention(
            "eva_attention",
            (eva.EvaAttention,),
            head_dims=False,
            what="heads (head dims kept: RoPE)",
            qkv_biases=True,
            q_norm="q_norm",
            k_norm="k_norm",
            value_paths=("norm", "gate"),
            forward_class=PrunedEvaAttention,
        ),
    )
