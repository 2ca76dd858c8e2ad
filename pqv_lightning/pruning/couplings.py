"""Channels removed together, named by the family handler: the blocks torch-pruning's tracer cannot follow.

torch-pruning finds coupled channels by tracing the graph. It cannot follow a per-head interleaved qkv split
(LeViT, EfficientFormer, TinyViT: an IndexError inside its pruner), ``C // num_heads`` reshapes, norms over a
head dimension or per-head relative-position tables, and on EfficientViT-M building the graph does not finish.
A family handler names such a coupling itself: ``groups`` x ``width`` root positions (e.g. heads x head
dimensions, position ``g * width + j``) and, for each member layer or parameter, the channels each root position
owns. Position ``j`` is removed in every group at once (the head count and per-head layout stay uniform).

Scoring uses torch-pruning's importance on a group built from the members, so L1/L2/Taylor/Hessian/LAMP/FPGM/...
and custom importances work unchanged. The removal is recorded as the same layer-pruner calls that traced pruning
records and is executed through :func:`~pqv_lightning.pruning.structure.replay_ops`, so a replay is bit-identical
by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers, ops
from torch_pruning.dependency import Dependency, Group
from torch_pruning.dependency.node import Node
from torch_pruning.pruner import function

from pqv_lightning.pruning import structure as st

__all__ = [
    "HEADS",
    "Coupling",
    "Member",
    "apply_couplings",
    "channels",
    "cols",
    "coupling_ops",
    "param",
    "removed_count",
    "rows",
    "select",
]


#: Suffix of the ``kind`` of a coupling whose positions are whole heads (ranked with ``head_ratio``).
HEADS = ".heads"


@dataclass(frozen=True)
class Member:
    """One layer (or parameter) of a coupling: ``channels[p]`` are its channels owned by root position ``p``.

    ``out``: output channels (rows) of a layer; ``False``: its input channels (columns). ``dim`` is the pruned
    dimension of a parameter (``is_param``).
    """

    name: str
    out: bool
    channels: tuple[tuple[int, ...], ...]
    is_param: bool = False
    dim: int = 0


@dataclass
class Coupling:
    """Channels removed together: ``width`` positions, the same in each of ``groups`` groups.

    ``kind`` names the structure (isomorphic pruning ranks couplings of one kind together). In each group, the first
    member with channels there must be a scored layer (linear, dense convolution, norm) owning exactly one channel
    per position: torch-pruning reduces a group's importance to the length of its first item. A member may own no
    channel in some groups (per-head layers).
    ``gate``: index of the member a VTP gate folds into exactly (an input-channel member of a linear or dense
    convolution, or an output member whose output feeds no norm), ``None`` if no gate fits.
    """

    name: str
    kind: str
    width: int
    members: list[Member]
    groups: int = 1
    gate: int | None = None
    min_keep: int = 1

    def __post_init__(self) -> None:
        n = self.groups * self.width
        bad = [m.name for m in self.members if len(m.channels) != n]
        if bad or not self.members:
            raise ValueError(f"coupling {self.name}: members {bad} do not have {n} positions")


def channels(
    width: int, groups: int = 1, stride: int | None = None, offset: int = 0, repeat: int = 1, repeat_stride: int = 0
) -> tuple[tuple[int, ...], ...]:
    """Channels of a layer laid out as ``groups`` blocks of ``stride`` (default ``width``) channels, position ``j``
    of group ``g`` at ``g * stride + offset + j`` (and ``repeat`` copies ``repeat_stride`` apart, e.g. q, k, v)."""
    stride = width if stride is None else stride
    return tuple(
        tuple(g * stride + offset + j + r * repeat_stride for r in range(repeat))
        for g in range(groups)
        for j in range(width)
    )


def rows(name: str, chans: tuple[tuple[int, ...], ...]) -> Member:
    return Member(name, True, chans)


def cols(name: str, chans: tuple[tuple[int, ...], ...]) -> Member:
    return Member(name, False, chans)


def param(name: str, dim: int, chans: tuple[tuple[int, ...], ...]) -> Member:
    return Member(name, True, chans, is_param=True, dim=dim)


def _pruner(target: nn.Module | nn.Parameter, out: bool):
    kind = ops.module2type(target)
    pruner = function.PrunerBox.get(kind)
    if pruner is None:
        raise TypeError(f"no torch-pruning layer pruner for {type(target).__name__}")
    return pruner.prune_out_channels if out else pruner.prune_in_channels


def _target(model: nn.Module, member: Member) -> nn.Module | nn.Parameter:
    if member.is_param:
        parent, _, attr = member.name.rpartition(".")
        return getattr(model.get_submodule(parent) if parent else model, attr)
    return model.get_submodule(member.name)


def _group(model: nn.Module, coupling: Coupling, g: int) -> Group | None:
    """A torch-pruning group over the positions of group ``g`` (for its importance estimators); its first item owns
    one channel per position (the length torch-pruning reduces importance to)."""
    group = Group()
    lo = g * coupling.width
    for member in coupling.members:
        pairs = sorted((c, j) for j in range(coupling.width) for c in member.channels[lo + j])  # tp sorts in place
        if not pairs:
            continue
        if not group._group and sorted(j for _, j in pairs) != list(range(coupling.width)):
            raise ValueError(f"coupling {coupling.name}: {member.name} must own one channel per position")
        target = _target(model, member)
        fn = _pruner(target, member.out)
        node = Node(target, None, member.name)
        node.pruning_dim = member.dim if member.is_param else -1
        item = _helpers.GroupItem(Dependency(fn, fn, node, node), [c for c, _ in pairs])
        item.root_idxs = [j for _, j in pairs]
        group._group.append(item)
    return group if group._group else None


def _score(model: nn.Module, coupling: Coupling, importance: tp.importance.Importance) -> torch.Tensor | None:
    """Importance of each position, averaged over the groups (each group scored on its own)."""
    scores = []
    for g in range(coupling.groups):
        group = _group(model, coupling, g)
        imp = importance(group) if group is not None else None
        if imp is None:
            continue
        imp = imp.detach().float().cpu().reshape(-1)
        if imp.numel() != coupling.width:
            raise ValueError(
                f"coupling {coupling.name}: importance has {imp.numel()} entries, expected {coupling.width} (the "
                "first member of each group must be a scored layer owning one channel per position)"
            )
        scores.append(imp)
    return torch.stack(scores).mean(0) if scores else None


def _clamp(n: int, width: int, round_to: int | None, min_keep: int) -> int:
    """``n`` positions to remove, rounded so that the kept count is a multiple of ``round_to``, at most
    ``width - min_keep``."""
    if round_to and n > 0:
        kept = width - n
        n = width - (kept - kept % round_to)
    return max(0, min(n, width - min_keep))


def removed_count(width: int, ratio: float, round_to: int | None = None, min_keep: int = 1) -> int:
    """Positions a local pruning at ``ratio`` removes from a coupling of ``width`` (torch-pruning's rounding)."""
    return _clamp(width - int(width * (1 - ratio)), width, round_to, min_keep)


def select(
    model: nn.Module,
    couplings: Sequence[Coupling],
    importance: tp.importance.Importance,
    ratio: float,
    head_ratio: float | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
    isomorphic: bool = False,
) -> list[list[int]]:
    """The root positions to remove from each coupling (all scored before any is pruned).

    Local (default): ``ratio`` of each coupling's positions (``head_ratio``, default ``ratio``, for couplings of
    whole heads). ``global_pruning``: one threshold over all couplings' (normalised) importances, heads apart;
    ``isomorphic``: one threshold per ``kind`` (torch-pruning's isomorphic scopes). Every coupling keeps at least
    ``min_keep`` (and, with ``round_to``, a multiple of it).
    """
    head_ratio = ratio if head_ratio is None else head_ratio
    scores = [_score(model, c, importance) for c in couplings]
    chosen: list[list[int]] = [[] for _ in couplings]
    scopes: dict[tuple[bool, str], list[int]] = {}
    for i, (c, s) in enumerate(zip(couplings, scores)):
        heads = c.kind.endswith(HEADS)
        if s is None or (head_ratio if heads else ratio) <= 0:
            continue
        key = c.kind if isomorphic else ("" if global_pruning else str(i))
        scopes.setdefault((heads, key), []).append(i)
    for (heads, _), members in scopes.items():
        ratio_here = head_ratio if heads else ratio
        if len(members) == 1:
            i = members[0]
            n = removed_count(couplings[i].width, ratio_here, round_to, couplings[i].min_keep)
            chosen[i] = sorted(torch.argsort(scores[i], stable=True)[:n].tolist())
            continue
        flat = torch.cat([scores[i] for i in members])
        n_total = len(flat) - int(len(flat) * (1 - ratio_here))
        if n_total <= 0:
            continue
        threshold = torch.sort(flat, stable=True).values[n_total - 1]
        for i in members:
            order = torch.argsort(scores[i], stable=True)
            n = _clamp(int((scores[i] <= threshold).sum()), couplings[i].width, round_to, couplings[i].min_keep)
            chosen[i] = sorted(order[:n].tolist())
    return chosen


def coupling_ops(model: nn.Module, couplings: Iterable[Coupling], chosen: Iterable[list[int]]) -> list[list]:
    """The layer-pruner calls (structure ops) that remove the chosen positions, one call per layer and side."""
    merged: dict[tuple, set[int]] = {}
    for coupling, positions in zip(couplings, chosen):
        if not positions:
            continue
        for member in coupling.members:
            target = _target(model, member)
            fn = _pruner(target, member.out)
            key = (
                "parameter" if member.is_param else "module",
                member.name,
                f"{type(fn.__self__).__name__}.{fn.__name__}",
                member.dim if member.is_param else -1,
            )
            removed = merged.setdefault(key, set())
            for g in range(coupling.groups):
                for j in positions:
                    removed.update(member.channels[g * coupling.width + j])
    return [[*key, sorted(idxs)] for key, idxs in merged.items()]


def apply_couplings(
    model: nn.Module,
    couplings: Sequence[Coupling],
    importance: tp.importance.Importance,
    ratio: float,
    **options: object,
) -> list[list]:
    """Score, select (``options``: those of :func:`select`) and remove; returns the structure ops (already applied
    to ``model``)."""
    chosen = select(model, couplings, importance, ratio, **options)
    op_list = coupling_ops(model, couplings, chosen)
    st.replay_ops(model, op_list)
    return op_list
