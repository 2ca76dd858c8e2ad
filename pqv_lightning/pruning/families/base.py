"""What every model family handler says: what may be pruned, with which torch-pruning settings, and the
attributes to fix afterwards (one family a module, registered in :mod:`pqv_lightning.pruning.families`).

Two kinds of handler. A :class:`Family` with *units* has torch-pruning trace a sub-network (the whole model for
ViTs) and prune it with ``MetaPruner``. A :class:`BlockFamily` names the coupled channels of each block type itself
(:class:`Block`, :mod:`~pqv_lightning.pruning.couplings`), for the hierarchical and hybrid models whose graphs
torch-pruning cannot follow; it never changes a block's input or output width, so what a block fixes afterwards
(head counts, key/value dims, scales, forward classes) is local to that block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from pqv_lightning.pruning.couplings import HEADS, Coupling
from pqv_lightning.pruning.spec import PruningSpec, unsupported

__all__ = ["Block", "BlockFamily", "DimsBlock", "Family", "Unit", "kept_channels", "unit_inputs"]


@dataclass
class Unit:
    """A sub-network pruned by one torch-pruning pruner (the whole model for ViTs)."""

    prefix: str
    module: nn.Module
    ignored: list[nn.Module]
    num_heads: dict[nn.Module, int]


class Family:
    """A model family: which models it matches, what it prunes (its units), and how it fixes them afterwards."""

    name = ""
    description = ""
    supports_global = True

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module, spec: PruningSpec | None) -> None:
        """Raise UnsupportedModelError for configurations this family cannot prune correctly."""
        if spec is not None and spec.global_pruning and not self.supports_global:
            raise unsupported(
                "global_pruning",
                True,
                f"global_pruning=False for {self.name} (its prunable units are pruned one by one)",
            )

    def heads(self, model: nn.Module) -> list[nn.Module]:
        head = model.get_classifier()
        return [m for m in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(m, nn.Module)]

    def units(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Unit]:
        """Sub-networks torch-pruning traces and prunes (``MetaPruner``), one after the other."""
        return []

    def couplings(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Coupling]:
        """Hand-named couplings, scored and pruned after the units (:mod:`~pqv_lightning.pruning.couplings`)."""
        return []

    def pruned_parts(self, spec: PruningSpec, model: nn.Module | None = None) -> str:
        """What a pruning with ``spec`` removes (in ``model``, if given), in words (for reports)."""
        return self.description

    def check_ratio(self, model: nn.Module, spec: PruningSpec, ratio: float) -> None:
        """Raise ValueError if `ratio` with `spec.round_to` would remove a whole dimension."""

    def min_width(self, model: nn.Module, spec: PruningSpec) -> int:
        raise NotImplementedError

    def before_surgery(self, model: nn.Module) -> dict:
        """What :meth:`capture` needs to know of the model as it was before the surgery."""
        return {}

    def capture(self, model: nn.Module, units: list[Unit], spec: PruningSpec, before: dict) -> dict:
        """Plain data about derived attributes, read right after torch-pruning's surgery."""
        return {}

    def finalize(self, model: nn.Module, extra: dict) -> None:
        """Set derived attributes (and fold scales) from `capture`'s data; used by prune and replay."""


def kept_channels(width: int, ratio: float, round_to: int | None, total: int | None = None) -> int:
    """Channels torch-pruning keeps in a local-pruning group (its rounding is against `total`)."""
    n_pruned = width - int(width * (1 - ratio))
    if round_to and n_pruned > 0:
        current = total or width
        rounded = current - n_pruned
        rounded -= rounded % round_to
        n_pruned = max(current - rounded, 0)
    return width - n_pruned


@torch.no_grad()
def unit_inputs(model: nn.Module, units: list[Unit], example_inputs: torch.Tensor) -> list[torch.Tensor]:
    """The input each unit sees on `example_inputs` (first sample only), for tracing the unit alone."""
    if len(units) == 1 and units[0].module is model:
        return [example_inputs]
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        u.module.register_forward_pre_hook(lambda _m, args, i=i: seen.setdefault(i, args[0][:1].detach().clone()))
        for i, u in enumerate(units)
    ]
    was_training = model.training
    try:
        model.eval()
        model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(units))]


class Block:
    """How one timm block type is pruned: the couplings it may remove and the attributes it fixes afterwards.

    ``head_dims`` / ``heads``: whether it shrinks head dimensions (``prune_heads=False``) / removes whole heads
    (``prune_heads=True``); a block without either only prunes its hidden (MLP or convolution) channels.
    """

    name = ""
    types: tuple[type, ...] = ()
    head_dims = False
    heads = False
    what = "hidden channels"

    def couplings(self, name: str, module: nn.Module, spec: PruningSpec) -> list[Coupling]:
        raise NotImplementedError

    def before(self, module: nn.Module) -> object:
        """What :meth:`state` needs to know of the block before the surgery (plain data)."""
        return None

    def state(self, module: nn.Module, spec: PruningSpec, before: object) -> dict | None:
        """Plain data read right after the surgery (before :meth:`restore`), or ``None`` if nothing is derived."""
        return None

    def restore(self, module: nn.Module, state: dict) -> None:
        """Set the derived attributes from :meth:`state`'s data (prune and replay alike)."""


class DimsBlock(Block):
    """A block whose coupled channels are head dims or attention channels but never whole heads: it removes
    nothing under ``prune_heads``."""

    head_dims = True

    def couplings(self, name: str, module: nn.Module, spec: PruningSpec) -> list[Coupling]:
        return [] if spec.prune_heads else self.dim_couplings(name, module)

    def dim_couplings(self, name: str, module: nn.Module) -> list[Coupling]:
        raise NotImplementedError


class BlockFamily(Family):
    """A model whose prunable channels all lie inside blocks (:class:`Block`): the stage widths are kept.

    ``blocks`` are matched by exact module type; a model with none of them is refused, and so is ``prune_heads``
    when no block of the model can remove heads.
    """

    model_type: type = nn.Module
    blocks: tuple[Block, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_type)

    def _sites(self, model: nn.Module) -> list[tuple[str, nn.Module, Block]]:
        by_type = {t: b for b in self.blocks for t in b.types}
        return [(n, m, by_type[type(m)]) for n, m in model.named_modules() if type(m) in by_type]

    def check(self, model: nn.Module, spec: PruningSpec | None) -> None:
        super().check(model, spec)
        sites = self._sites(model)
        if not sites:
            raise unsupported(
                "model",
                type(model).__name__,
                f"a {self.name} model with at least one prunable block: "
                + ", ".join(t.__name__ for b in self.blocks for t in b.types),
            )
        if spec is not None and spec.prune_heads and not any(b.heads for _, _, b in sites):
            accepted = dataclasses.replace(spec, prune_heads=False)
            raise unsupported(
                "prune_heads",
                True,
                f"prune_heads=False for {self.name} (no block of it can remove whole heads; it prunes "
                f"{self.pruned_parts(accepted, model)})",
            )

    def pruned_parts(self, spec: PruningSpec, model: nn.Module | None = None) -> str:
        present = self.blocks if model is None else [b for _, _, b in self._sites(model)]
        parts = []
        for block in dict.fromkeys(present):
            if spec.prune_heads and block.heads:
                what = f"{block.name}: heads"
            elif (block.head_dims and not spec.prune_heads) or not (block.heads or block.head_dims):
                what = f"{block.name}: {block.what}"
            else:
                continue
            parts.append(what)
        return "; ".join(parts)

    def couplings(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Coupling]:
        out = []
        for name, module, block in self._sites(model):
            for coupling in block.couplings(name, module, spec):
                if coupling.width <= coupling.min_keep:
                    continue  # e.g. a single head: nothing to remove
                owners = [model.get_submodule(m.name) for m in coupling.members if m.out and not m.is_param]
                if not any(any(o is i for i in ignored) for o in owners):
                    out.append(coupling)
        return out

    def check_ratio(self, model: nn.Module, spec: PruningSpec, ratio: float) -> None:
        if ratio == 0 or spec.global_pruning or spec.isomorphic:
            return
        head_ratio = ratio if spec.head_ratio is None else spec.head_ratio
        for c in self.couplings(model, spec, []):
            r = head_ratio if c.kind.endswith(HEADS) else ratio
            n = c.width - int(c.width * (1 - r))
            kept = c.width - n
            if spec.round_to:
                kept -= kept % spec.round_to
            if kept < c.min_keep:
                raise ValueError(
                    f"ratio={r} with round_to={spec.round_to} would remove every channel of {c.name} "
                    f"(width {c.width}); accepted: a smaller ratio or round_to."
                )

    def min_width(self, model: nn.Module, spec: PruningSpec) -> int:
        return min(c.width for c in self.couplings(model, spec, []))

    def before_surgery(self, model: nn.Module) -> dict:
        return {name: block.before(module) for name, module, block in self._sites(model)}

    def capture(self, model: nn.Module, units: list[Unit], spec: PruningSpec, before: dict) -> dict:
        blocks = {}
        for name, module, block in self._sites(model):
            state = block.state(module, spec, before[name])
            if state is not None:
                blocks[name] = {"block": block.name, **state}
        return {"blocks": blocks}

    def finalize(self, model: nn.Module, extra: dict) -> None:
        by_name = {b.name: b for b in self.blocks}
        modules = dict(model.named_modules())
        for name, state in extra.get("blocks", {}).items():
            block = by_name.get(state.get("block"))
            if block is None or name not in modules:
                raise ValueError(f"structure block {name!r} ({state.get('block')!r}) does not match the model")
            block.restore(modules[name], {k: v for k, v in state.items() if k != "block"})
