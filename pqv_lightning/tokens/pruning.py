"""EViT's token reorganisation (Liang et al., ICLR 2022) with the same knob as merging: ``r`` tokens fewer a block.

The class token's attention to each patch token (softmax over all keys, averaged over heads) ranks the patch
tokens; the ``T - r - 1`` most attended stay, the ``r + 1`` others are fused into one token: their mean weighted by
that attention (EViT sums them weighted by the raw attention; the weighted mean keeps the fused token in the range
of the tokens it replaces, which a model used off the shelf needs). Sizes add up as in merging, so size-weighted
average pooling stays the mean over the original tokens.

Static shapes: ``r`` is a Python int; ``topk``, ``scatter``, ``scatter_add`` and ``gather`` only, and no
concatenation along the token dim touches the tokens (see :func:`pqv_lightning.tokens.matching.merge_wavg`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pqv_lightning.tokens.matching import rows

__all__ = ["fuse_inattentive"]


def fuse_inattentive(x: Tensor, size: Tensor, attention: Tensor, r: int, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """``x`` ``[B, N, C]`` (each token standing for ``size`` ``[B, N, 1]`` tokens) with ``r`` tokens fewer: the
    ``prefix`` tokens, the ``T - r - 1`` patch tokens most attended by ``attention`` ``[B, T]`` (the class token's,
    over the ``T = N - prefix`` patch tokens), then the fused rest; and their sizes.

    ``r`` must be in ``[1, T // 2]``. Neither the ranking nor the fusion weights carry a gradient (EViT's weights
    do): a gradient path from the attention's q/k channels into the token values would couple those channels to
    the embedding width for torch-pruning's dependency graph, and pruning a reduced model would fail.
    """
    b, t = attention.shape
    keep = t - r - 1
    attention = attention.detach()
    ranked = attention.topk(t, dim=-1).indices  # a full descending sort (ExecuTorch has topk, no sort)
    # the dropped tokens' weights, normalised; every other token keeps weight 1
    share = attention.gather(1, ranked[:, keep:])
    share = share / share.sum(dim=1, keepdim=True).clamp_min(torch.finfo(share.dtype).tiny)
    # sequence positions looked up, not computed (a quantizer annotates integer add as it would a float one)
    order = torch.arange(prefix, prefix + t, device=ranked.device).expand(b, -1).gather(1, ranked)
    kept, dropped = order[:, :keep], order[:, keep:]
    weights = torch.ones_like(size[..., 0]).scatter(1, dropped, share.to(size.dtype)).unsqueeze(-1)
    # the fused token sits where the first dropped token was
    host = dropped[:, :1].expand(b, r)
    index = [kept, dropped[:, :1]]
    if prefix:
        index.insert(0, torch.arange(prefix, device=ranked.device).expand(b, -1))
    index = torch.cat(index, dim=1)
    out = []
    for values in (x * weights, size):
        width = values.shape[-1]
        fused = values.scatter_add(1, rows(host, width), values.gather(1, rows(dropped[:, 1:], width)))
        out.append(fused.gather(1, rows(index, width)))
    return out[0], out[1]
