"""What every model family handler says: what may be pruned, with which torch-pruning settings, and the
attributes to fix afterwards (one family a module, registered in :mod:`pqv_lightning.pruning.families`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pqv_lightning.pruning.spec import PruningSpec, UnsupportedModelError

__all__ = ["Family", "Unit", "kept_channels", "unit_inputs"]


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
            raise UnsupportedModelError(
                f"global_pruning=True is not supported for {self.name} "
                "(its prunable units are pruned one by one); use global_pruning=False."
            )

    def heads(self, model: nn.Module) -> list[nn.Module]:
        head = model.get_classifier()
        return [m for m in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(m, nn.Module)]

    def units(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Unit]:
        raise NotImplementedError

    def check_ratio(self, model: nn.Module, spec: PruningSpec, ratio: float) -> None:
        """Raise ValueError if `ratio` with `spec.round_to` would remove a whole dimension."""

    def min_width(self, model: nn.Module, spec: PruningSpec) -> int:
        raise NotImplementedError

    def capture(self, model: nn.Module, units: list[Unit]) -> dict:
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
