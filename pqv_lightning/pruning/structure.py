"""The pruned structure as plain data: record torch-pruning's surgery, replay it without a graph.

Every channel removal torch-pruning performs ends in one layer-pruner call, `fn(module, idxs)`, or a
parameter slice. Recording those calls in order (names, not objects) and replaying them with the same
pruner functions reproduces the pruned network exactly (same shapes, same `index_select` on the same
weights) without tracing the model again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers, ops
from torch_pruning.pruner import function

FORMAT = "pqv_lightning.pruning"
VERSION = 1

_PRUNERS: dict[str, function.BasePruningFunc] = {
    type(p).__name__: p for p in function.PrunerBox.values() if p is not None
}


def register_pruner(pruner: function.BasePruningFunc) -> function.BasePruningFunc:
    """Make a custom layer pruner replayable by its class name."""
    _PRUNERS[type(pruner).__name__] = pruner
    return pruner


def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def out_width(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features", "embedding_dim"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    return None


class Recorder:
    """Prunes torch-pruning groups and records each layer-level call as data."""

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        """`prefix`: the traced unit's name in `model` (parameter names are relative to the unit)."""
        self.model = model
        self.prefix = prefix
        self.ops: list[list] = []
        self._names = {m: n for n, m in model.named_modules()}

    def prune_group(self, group: tp.dependency.Group) -> None:
        dg = group._DG
        for dep, idxs in group:
            target = dep.target
            plain = [
                int(i)
                for i in (_helpers.to_plain_idxs(idxs) if idxs and isinstance(idxs[0], _helpers._HybridIndex) else idxs)
            ]
            if not plain:
                continue
            fn = f"{type(dep.handler.__self__).__name__}.{dep.handler.__name__}"
            if target.type == ops.OPTYPE.PARAMETER:
                self.ops.append(
                    [
                        "parameter",
                        self.prefix + dg._param_to_name[target.module],
                        fn,
                        int(target.pruning_dim),
                        plain,
                    ]
                )
            elif target.module in self._names:
                self.ops.append(["module", self._names[target.module], fn, int(target.pruning_dim), plain])
        group.prune()


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replay_ops(model: nn.Module, op_list: Iterable[list]) -> None:
    """Apply recorded layer-pruner calls in order (validated entry by entry)."""
    for i, op in enumerate(op_list):
        if not (isinstance(op, (list, tuple)) and len(op) == 5):
            raise ValueError(f"structure op #{i} is malformed: {op!r}")
        kind, name, fn, dim, idxs = op
        cls_name, _, fn_name = str(fn).partition(".")
        pruner = _PRUNERS.get(cls_name)
        if pruner is None or fn_name not in ("prune_out_channels", "prune_in_channels"):
            raise ValueError(f"structure op #{i} names an unknown pruner {fn!r}; known: {sorted(_PRUNERS)}")
        pruner.pruning_dim = int(dim)
        pruning_fn = getattr(pruner, fn_name)
        try:
            if kind == "module":
                module = model.get_submodule(name)
                if fn_name == "prune_out_channels":
                    count = pruner.get_out_channels(module)
                else:
                    count = pruner.get_in_channels(module)
                if count is not None and (max(idxs) >= count or len(idxs) >= count):
                    raise ValueError(f"indices out of range for {count} channels")
                pruning_fn(module, list(idxs))
            elif kind == "parameter":
                parent, attr = _resolve(model, name)
                param = getattr(parent, attr)
                if not isinstance(param, nn.Parameter) or max(idxs) >= param.shape[int(dim)]:
                    raise ValueError("not a parameter or indices out of range")
                setattr(parent, attr, pruning_fn(param, list(idxs)))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (AttributeError, IndexError, ValueError, RuntimeError, AssertionError) as err:
            raise ValueError(f"structure does not match the model at op #{i} ({kind} {name!r}, {fn}): {err}") from err


def check_header(structure: dict, family: str) -> None:
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(
            f"not a pruning structure (expected format {FORMAT!r}, got "
            f"{structure.get('format') if isinstance(structure, dict) else type(structure)!r})"
        )
    if structure.get("version") != VERSION:
        raise ValueError(f"structure version {structure.get('version')!r} is not supported; accepted: {VERSION}")
    if structure.get("family") != family:
        raise ValueError(f"structure was recorded on family {structure.get('family')!r}, this model is {family!r}")


def check_shapes(model: nn.Module, expected: dict, when: str) -> None:
    actual = shapes_of(model)
    expected = {k: list(v) for k, v in expected.items()}
    if actual == expected:
        return
    missing = sorted(set(expected) - set(actual))[:5]
    extra = sorted(set(actual) - set(expected))[:5]
    wrong = [
        f"{k}: model {actual[k]} vs structure {expected[k]}"
        for k in expected
        if k in actual and actual[k] != expected[k]
    ][:5]
    raise ValueError(
        f"structure does not match the model ({when}): missing={missing} unexpected={extra} shape mismatches={wrong}"
    )


def drop_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@torch.no_grad()
def scale_rows(weight: torch.Tensor, rows: int, factor: float) -> None:
    weight[:rows].mul_(factor)
