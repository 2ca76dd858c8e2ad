"""Channel importance criteria by name: torch-pruning's estimators, and the statistics the data-driven ones read.

``l1``/``l2`` (group magnitude), ``lamp`` (layer-adaptive magnitude, LAMP), ``fpgm`` (geometric median), ``random``
need only the weights. ``taylor`` and ``hessian`` read the gradients accumulated in ``p.grad`` (see
:func:`pqv_lightning.pruning.prune`). ``activation`` (mean absolute input of each channel) and ``obdc`` (Optimal
Brain Damage in the diagonal empirical Fisher, EigenDamage's OBD-C) read statistics that forward / backward hooks
collect over the same calibration batches (:func:`collecting`); they are kept on the layers themselves, so a deep
copy of the model (the budget search) scores alike, and removed by :func:`clear_statistics`.

torch-pruning's own ``OBDCImportance`` assumes 2-D linear inputs and bias-free layers (its Fisher gets a bias
column the weight lacks); :class:`OBDCImportance` here computes per-sample gradients of token inputs and leaves the
bias out. ``ActivationImportance`` keeps only the last batch's statistics; :func:`collecting` sums all batches.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch_pruning.pruner import function

__all__ = [
    "GRADIENT_IMPORTANCES",
    "HOOKED_IMPORTANCES",
    "IMPORTANCES",
    "OBDCImportance",
    "clear_statistics",
    "collecting",
    "make_importance",
]

IMPORTANCES = ("l1", "l2", "taylor", "hessian", "random", "lamp", "fpgm", "obdc", "activation")
#: Criteria that read gradients accumulated in ``p.grad`` over the calibration batches (all-reduced under DDP).
GRADIENT_IMPORTANCES = ("taylor", "hessian")
#: Criteria whose statistics forward/backward hooks collect during calibration (rank 0's data under DDP).
HOOKED_IMPORTANCES = ("obdc", "activation")

_FISHER = "_pqv_fisher"
_ACTIVATION = "_importance"  # the attribute torch-pruning's ActivationImportance reads
_STATS = (_FISHER, _ACTIVATION, "_pqv_fisher_input")


def _dense(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class OBDCImportance(tp.importance.GroupMagnitudeImportance):
    """OBD in the diagonal empirical Fisher: a channel scores ``sum_i w_i**2 * F_ii`` over the weights of the
    output channels it owns (EigenDamage's OBD-C criterion, as torch-pruning's ``OBDCImportance``)."""

    def __init__(self, group_reduction: str = "mean", normalizer: str = "mean") -> None:
        super().__init__(p=2, group_reduction=group_reduction, normalizer=normalizer)

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            fisher = getattr(layer, _FISHER, None)
            if fisher is None or fn not in (function.prune_linear_out_channels, function.prune_conv_out_channels):
                continue
            rows = torch.as_tensor(idxs, dtype=torch.long, device=layer.weight.device)
            w = layer.weight.detach()[rows].flatten(1)
            group_imp.append((w.pow(2) * fisher[rows].to(w.device)).sum(1))
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class _ActivationImportance(tp.importance.ActivationImportance):
    """torch-pruning's activation criterion (``|input|`` of each input channel), scored on summed statistics."""


def make_importance(name: str) -> tp.importance.Importance:
    """The estimator for a criterion name in :data:`IMPORTANCES` (torch-pruning's defaults otherwise)."""
    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,
        "hessian": tp.importance.GroupHessianImportance,
        "random": tp.importance.RandomImportance,
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "obdc": OBDCImportance,
        "activation": _ActivationImportance,
    }[name]()


def _add(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    current = getattr(module, attr, None)
    object.__setattr__(module, attr, value if current is None else current + value)


def _activation_hook(module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
    x = args[0].detach()
    if isinstance(module, nn.Linear):
        _add(module, _ACTIVATION, x.abs().reshape(-1, x.shape[-1]).sum(0))
    else:
        _add(module, _ACTIVATION, x.abs().mean((0, 2, 3)))


def _save_input(module: nn.Module, args: tuple) -> None:
    object.__setattr__(module, "_pqv_fisher_input", args[0].detach())


def _fisher_hook(module: nn.Module, _grad_in: tuple, grad_out: tuple) -> None:
    """Adds the squared per-sample weight gradients of this backward pass (batch-mean loss: scaled by B)."""
    x, g = module.__dict__.pop("_pqv_fisher_input"), grad_out[0].detach()
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        per_sample = torch.einsum("bno,bni->boi", g.reshape(b, -1, g.shape[-1]), x.reshape(b, -1, x.shape[-1]))
    else:
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, in*k*k, L]
        per_sample = torch.einsum("bol,bil->boi", g.flatten(2), patches)
    _add(module, _FISHER, (per_sample * b).pow(2).sum(0))


@contextlib.contextmanager
def collecting(model: nn.Module, importance: tp.importance.Importance) -> Iterator[None]:
    """Collect the statistics ``importance`` reads (if any) over the forward/backward passes in this block."""
    handles = []
    for module in model.modules():
        if isinstance(importance, _ActivationImportance) and isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(_activation_hook))
        elif isinstance(importance, OBDCImportance) and _dense(module):
            handles.append(module.register_forward_pre_hook(_save_input))
            handles.append(module.register_full_backward_hook(_fisher_hook))
    try:
        with warnings.catch_warnings():  # the first layer's input needs no gradient: its hook still fires
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.__dict__.pop("_pqv_fisher_input", None)


def clear_statistics(model: nn.Module) -> None:
    """Remove what :func:`collecting` left on the layers."""
    for module in model.modules():
        for attr in _STATS:
            module.__dict__.pop(attr, None)
