"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023) with static shapes, and the size-weighted merge.

The patch tokens alternate into sets A (even positions) and B (odd positions); every A token finds its most similar
B token (cosine similarity of the metric, the attention keys averaged over heads); the ``r`` A tokens with the most
similar partners are merged into them, the others stay. Merging averages ``x * size`` and adds the sizes, so a token
always is the mean of the original tokens it stands for.

Export: ``r`` is a Python int and every shape follows from the input shape, so the graph is static. A and B are
taken by a reshape (no strided slice). The matching is ``max`` and a descending sort on the small ``[B, T/2, T/2]``
score matrix: ``topk`` over all entries (ExecuTorch's portable kernels have no ``sort``) and cosine similarity
through ``rsqrt`` of a sum (they have no vector norm). The merge is one ``scatter_add`` and two ``gather``s per
tensor (tokens and sizes), with index tensors built by ``arange`` and ``cat``. Class, distillation and register
tokens (the first ``prefix`` tokens) are never matched and never merged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Matching", "alternate", "bipartite_soft_matching", "merge_wavg", "rows"]


class Matching(NamedTuple):
    """Which A tokens stay (``unmerged``, ``[B, |A| - r]``), which merge (``source``, ``[B, r]``) and into which B
    token each merges (``destination``, ``[B, r]``)."""

    unmerged: Tensor
    source: Tensor
    destination: Tensor


def alternate(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x[:, 0::2]`` and ``x[:, 1::2]`` of ``[B, T, ...]`` by a reshape (XNNPACK has no strided slice)."""
    t = x.shape[1]
    half = t // 2
    pairs = x[:, : 2 * half].reshape(x.shape[0], half, 2, *x.shape[2:])
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    if t % 2:
        a = torch.cat([a, x[:, 2 * half :]], dim=1)
    return a, b


def bipartite_soft_matching(metric: Tensor, r: int) -> Matching:
    """The matching of ``r`` token pairs of ``metric`` ``[B, T, C]`` (no gradient flows through it).

    ``r`` must be in ``[1, T // 2]``; ties between equally similar partners go to the lower index, as in ToMe.
    """
    metric = metric.detach()
    metric = metric * torch.rsqrt((metric * metric).sum(dim=-1, keepdim=True).clamp_min(1e-12))
    a, b = alternate(metric)
    scores = a @ b.transpose(-1, -2)
    best, partner = scores.max(dim=-1)
    order = best.topk(best.shape[-1], dim=-1).indices  # a full descending sort: ExecuTorch has topk, no sort
    source = order[:, :r]
    return Matching(order[:, r:], source, partner.gather(1, source))


def rows(index: Tensor, width: int) -> Tensor:
    """``index`` ``[B, K]`` expanded to ``[B, K, width]`` for ``gather``/``scatter_add`` along the token dim."""
    return index.unsqueeze(-1).expand(index.shape[0], index.shape[1], width)


def merge_wavg(x: Tensor, size: Tensor, matching: Matching, prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Merge the patch tokens of ``x`` ``[B, N, C]`` (after ``prefix`` tokens kept as they are; each token standing
    for ``size`` ``[B, N, 1]`` original tokens) by ``matching``: ``N - r`` tokens, each the size-weighted mean of
    what merged into it, and their summed sizes.

    Each merged A token is added into its B partner in place of the sequence (``scatter_add``), then the kept
    tokens are gathered: the prefix, the unmerged A tokens, all B tokens. No concatenation along the token dim
    touches ``x`` (torch-pruning's dependency graph takes such a ``cat`` for a channel concatenation and fails, so
    pruning a reduced model works this way), and sequence positions are looked up in ``arange`` tables rather than
    computed (a quantizer annotates integer ``mul``/``add`` as it would float ones).
    """
    b, n = x.shape[0], x.shape[1]
    device = matching.source.device
    evens = torch.arange(prefix, n, 2, device=device).expand(b, -1)
    odds = torch.arange(prefix + 1, n, 2, device=device).expand(b, -1)
    source = rows(evens.gather(1, matching.source), 1)
    destination = rows(odds.gather(1, matching.destination), 1)
    keep = [evens.gather(1, matching.unmerged), odds]
    if prefix:
        keep.insert(0, torch.arange(prefix, device=device).expand(b, -1))
    keep = torch.cat(keep, dim=1).unsqueeze(-1)
    out = []
    for values in (x * size, size):
        width = values.shape[-1]
        moved = values.gather(1, source.expand(-1, -1, width))
        summed = values.scatter_add(1, destination.expand(-1, -1, width), moved)
        out.append(summed.gather(1, keep.expand(-1, -1, width)))
    merged_x, merged_size = out
    return merged_x / merged_size, merged_size
