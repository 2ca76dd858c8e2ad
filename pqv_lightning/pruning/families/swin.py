"""Swin (``swin_*``) and SwinV2 (``swinv2_*``): shifted-window attention with relative position biases.

Swin's ``WindowAttention``: one ``[3, heads, head_dim]`` qkv projection, a relative-position bias table
``[(2w-1)^2, heads]`` indexed by a fixed buffer, a fused path (SDPA with the bias and the shift mask as mask)
and an eager one. SwinV2's: cosine attention (q and k normalised over the head dim, per-head ``logit_scale``),
separate ``q_bias``/``v_bias`` (and a zero ``k_bias`` buffer), and the bias table computed per head by a small MLP
(``cpb_mlp``) from a fixed coordinate table. Pruned: head dims (q, k, v, their biases and ``proj``'s columns), or
whole heads (``prune_heads``: also the bias-table column (Swin) or ``logit_scale`` row and ``cpb_mlp``'s output row
(SwinV2)), and the MLP hidden channels. The window masks, index buffers and coordinate tables do not depend on the
pruned sizes. Fixed afterwards: ``num_heads``; Swin: the trained scale folded into the q rows and ``scale`` set to
the new head dim's default (fused == eager); SwinV2: ``k_bias`` resized, and a forward that reshapes the output to
the attention width (timm's uses the input width ``C``). Patch-merging widths are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as swin
from timm.models import swin_transformer_v2 as swin2

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import MLPS, FusedQKVAttention, merge_heads, qkv_with_biases, split_heads

__all__ = ["PrunedWindowAttentionV2", "SwinFamily", "SwinV2Family"]


class PrunedWindowAttentionV2(swin2.WindowAttention):
    """SwinV2 window attention whose output width is the (pruned) attention width, not the input width."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _, n, _ = x.shape
        q, k, v = split_heads(qkv_with_biases(self, x), self.num_heads)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).contiguous()
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


class SwinFamily(BlockFamily):
    name = "swin"
    description = "timm SwinTransformer: swin_* (MLP hidden, head dims or heads)"
    model_type = swin.SwinTransformer
    blocks = (
        *MLPS,
        FusedQKVAttention(
            "swin_window_attention", (swin.WindowAttention,), tables=(("relative_position_bias_table", 1),)
        ),
    )


class SwinV2Family(BlockFamily):
    name = "swinv2"
    description = "timm SwinTransformerV2: swinv2_* (MLP hidden, head dims or heads)"
    model_type = swin2.SwinTransformerV2
    blocks = (
        *MLPS,
        FusedQKVAttention(
            "swinv2_window_attention",
            (swin2.WindowAttention,),
            qkv_biases=True,
            tables=(("logit_scale", 0), ("cpb_mlp.2", "rows")),
            forward_class=PrunedWindowAttentionV2,
        ),
    )
