"""XCiT (``xcit_*``): cross-covariance attention, local patch interaction, then class-attention blocks.

``XCA`` attends between the channels of each head (tokens L2-normalised, a learned per-head ``temperature``, no
softmax scale); ``ClassAttn`` is CaiT's. Pruned: MLP hidden channels; XCA head dims (q, k, v rows, ``proj``'s
columns: each removed dim is one channel fewer in its head's channel attention) and ClassAttn key/value dims, or
whole heads (also their temperatures). Fixed afterwards: ``num_heads``, ClassAttn's scale fold (see
:mod:`~pqv_lightning.pruning.families.cait`), and forwards that reshape with the attention width (timm's use
``C // num_heads`` and ``C``). The local patch interaction (depthwise convolutions on the embedding), the
embedding width and the layer scales are kept.
"""

from __future__ import annotations

import torch
from timm.models import xcit

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.cait import CLASS_ATTENTION
from pqv_lightning.pruning.families.layers import MLPS, CrossCovarianceAttention, cross_covariance

__all__ = ["PrunedXCA", "XCiTFamily"]


class PrunedXCA(xcit.XCA):
    """XCiT's cross-covariance attention over the (pruned) head dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cross_covariance(self, x)


class XCiTFamily(BlockFamily):
    name = "xcit"
    description = "timm Xcit: xcit_* (MLP hidden, XCA and class-attention head dims or heads)"
    model_type = xcit.Xcit
    blocks = (
        *MLPS,
        CrossCovarianceAttention("xcit_xca", (xcit.XCA,), forward_class=PrunedXCA),
        CLASS_ATTENTION,
    )
