"""Token reduction as one matrix product: the form a graph compiler can keep inside its fast kernels.

The gather form (:func:`~pqv_lightning.tokens.matching.merge_wavg`, :func:`~pqv_lightning.tokens.pruning.
fuse_inattentive`) moves the ``[B, N, C]`` tokens with ``gather``/``scatter_add``, operators XNNPACK has no
kernel for: an ExecuTorch program then runs them, and the index tensors expanded to ``[B, K, C]``, in its portable
kernels, once per block. Here only the matching itself works on integers: it gives every token its output *slot*
(``[B, 1, N]``: where it goes among the ``N - r`` tokens left), and every token a weight (its size for merging, the
class token's attention for pruning). The reduction is then

    M[b, slot[b, j], j] = weight[b, j];   x' = (M @ x) / (M @ 1);   size' = M @ 1 (merge) or the summed sizes (prune)

(``M`` ``[B, N - r, N]`` built by one ``scatter``; ``M @ 1`` is a ``bmm`` with a column of ones: exact sums of
integer sizes, and no ``mul`` a static quantizer would annotate), and everything on the tokens is a ``bmm`` and a
division, which XNNPACK delegates. The price is a dense product where a gather would do: ``2 (N - r) N C`` flops a
block, in fp32 (deit_small at r=13: 149 MFLOP, 2.6% of the network's 5.7 GFLOP). The result is the gather form's
function (the same order of tokens, the same means) up to float rounding; :func:`pqv_lightning.tokens.
set_reduction_form` switches a model to it (``prepare_for_xnnpack`` does).

Integers are only looked up (``gather`` in constant tables) and written (``scatter``), never computed: the PT2E
quantizers annotate integer ``add``/``mul``/``cat`` as they would float ones. Every index tensor is ``[B, 1, K]``,
so no reshape of an integer tensor is needed between the operators that stay outside a delegate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from pqv_lightning.tokens.matching import alternate

__all__ = ["merge_slots", "prune_slots", "reduce_by_slots"]


def _row(values: Iterable[int], batch: int, device: torch.device) -> Tensor:
    """A constant ``[batch, 1, K]`` int64 table (built from Python ints: a constant of an exported program)."""
    table = torch.tensor([[list(values)]], dtype=torch.long, device=device)
    return table.expand(batch, 1, table.shape[-1])


def _normalized(metric: Tensor) -> Tensor:
    """``metric / |metric|`` over the last dim, the squared norm as a mean times the width (XNNPACK delegates a
    mean, not a sum)."""
    width = float(metric.shape[-1])
    return metric * torch.rsqrt(((metric * metric).mean(dim=-1, keepdim=True) * width).clamp_min(1e-12))


def merge_slots(metric: Tensor, r: int, prefix: int) -> Tensor:
    """ToMe's bipartite soft matching of ``r`` pairs of the patch tokens' ``metric`` ``[B, T, C]`` as the output
    slot of every token, ``[B, 1, prefix + T]`` int64: the prefix tokens, the unmerged A tokens (in the order of
    :func:`~pqv_lightning.tokens.matching.bipartite_soft_matching`), then every B token; a merged A token goes to its
    B partner's slot. ``r`` must be in ``[1, T // 2]``."""
    metric = _normalized(metric.detach())
    batch, t = metric.shape[0], metric.shape[1]
    device = metric.device
    a, b = alternate(metric)
    count_a, count_b = a.shape[1], b.shape[1]
    kept_a = count_a - r
    # scores with A along the last dim: the best partner of each A token comes out as [B, 1, |A|]
    best, partner = (b @ a.transpose(-1, -2)).max(dim=1, keepdim=True)
    order = best.topk(count_a, dim=-1).indices  # a full descending sort (ExecuTorch has topk, no sort)
    slot_a = _row(range(prefix + kept_a, prefix + kept_a + count_b), batch, device).gather(2, partner)
    slot_a = slot_a.scatter(2, order[:, :, r:], _row(range(prefix, prefix + kept_a), batch, device))
    base = [*range(prefix), *(prefix + kept_a + i // 2 if i % 2 else 0 for i in range(t))]
    evens = _row(range(prefix, prefix + t, 2), batch, device)
    return _row(base, batch, device).scatter(2, evens, slot_a)


def prune_slots(attention: Tensor, r: int, prefix: int) -> tuple[Tensor, Tensor]:
    """EViT's reorganisation (:func:`~pqv_lightning.tokens.pruning.fuse_inattentive`) of the patch tokens ranked by
    ``attention`` ``[B, 1, T]`` as (output slot ``[B, 1, prefix + T]``, weight ``[B, 1, prefix + T]``): the prefix,
    the ``T - r - 1`` most attended in rank order (weight 1), and one slot for the rest, weighted by their
    attention. ``r`` must be in ``[1, T // 2]``."""
    attention = attention.detach()
    batch, t = attention.shape[0], attention.shape[-1]
    device = attention.device
    keep = t - r - 1
    values, ranked = attention.topk(t, dim=-1)
    positions = _row(range(prefix, prefix + t), batch, device).gather(2, ranked)
    ranks = _row((prefix + min(k, keep) for k in range(t)), batch, device)
    slot = _row([*range(prefix), *([0] * t)], batch, device).scatter(2, positions, ranks)
    rank_weight = values.scatter(2, _row(range(keep), batch, device), 1.0)
    weight = attention.new_ones(batch, 1, prefix + t).scatter(2, positions, rank_weight)
    return slot, weight


def reduce_by_slots(
    x: Tensor, size: Tensor | None, slot: Tensor, weight: Tensor | float, out_tokens: int, sizes_from_rows: bool
) -> tuple[Tensor, Tensor]:
    """``x`` ``[B, N, C]`` reduced to ``out_tokens`` tokens, each the ``weight``-weighted mean of the tokens whose
    ``slot`` it is, and the sizes ``[B, out_tokens, 1]``: the rows' total weight when ``sizes_from_rows`` (the
    weights are the sizes: merging), else the summed ``size`` (``None``: every token 1)."""
    batch, n = x.shape[0], x.shape[1]
    matrix = x.new_zeros(batch, out_tokens, n).scatter(1, slot, weight)
    totals = torch.bmm(matrix, x.new_ones(1, n, 1).expand(batch, n, 1))
    out = torch.bmm(matrix, x) / totals.clamp_min(torch.finfo(x.dtype).tiny)
    if sizes_from_rows:
        return out, totals
    sizes = x.new_ones(batch, 1, n) if size is None else size.reshape(batch, 1, n)
    summed = x.new_zeros(batch, 1, out_tokens).scatter_add(2, slot, sizes)
    return out, summed.reshape(batch, out_tokens, 1)
