"""EdgeNeXt (``edgenext_*``): depthwise-convolution blocks and split-depthwise-transpose attention blocks.

Both block types end in a timm ``Mlp`` on channels-last tokens; the transpose blocks attend across channels
(``CrossCovarianceAttn``: XCiT's cross-covariance attention, per-head ``temperature``). Pruned: MLP hidden channels,
XCA head dims (q, k, v rows, ``proj``'s columns) or whole heads (``prune_heads``: also their temperatures). Fixed
afterwards: ``num_heads`` and a forward that reshapes the output to the attention width (timm's uses the input
width ``C``). The multi-scale depthwise convolutions, layer scales (``gamma``) and stage widths are kept.
"""

from __future__ import annotations

import torch
from timm.models import edgenext

from pqv_lightning.pruning.families.base import BlockFamily
from pqv_lightning.pruning.families.layers import MLPS, CrossCovarianceAttention, cross_covariance

__all__ = ["EdgeNeXtFamily", "PrunedCrossCovarianceAttn"]


class PrunedCrossCovarianceAttn(edgenext.CrossCovarianceAttn):
    """EdgeNeXt's XCA whose output width is the (pruned) attention width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cross_covariance(self, x)


class EdgeNeXtFamily(BlockFamily):
    name = "edgenext"
    description = "timm EdgeNeXt: edgenext_* (MLP hidden, XCA head dims or heads)"
    model_type = edgenext.EdgeNeXt
    blocks = (
        *MLPS,
        CrossCovarianceAttention(
            "edgenext_xca",
            (edgenext.CrossCovarianceAttn,),
            forward_class=PrunedCrossCovarianceAttn,
        ),
    )
