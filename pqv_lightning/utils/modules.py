"""Copies of a model for the work that runs beside training (measuring, quantizing, exporting), and hooked runs."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["cpu_float_copy", "run_with_input_hooks"]


def cpu_float_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``module`` in eval mode, without gradients.

    ``copy.deepcopy(model).cpu().float()`` of a GPU model first copies every parameter, buffer and gradient on the
    GPU (twice the model's memory there, at the end of a fit that may have used it all); here each tensor is copied
    straight to the CPU, and gradients are left behind. Non-float buffers keep their dtype.
    """
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) in memo:
            continue
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        data = tensor.detach().to(device="cpu", dtype=dtype, copy=True)
        memo[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
    return copy.deepcopy(module, memo).eval()


def run_with_input_hooks(
    model: nn.Module, hooks: Iterable[tuple[nn.Module, Callable[[nn.Module, tuple], None]]], batches: Iterable[Tensor]
) -> None:
    """Run ``batches`` through ``model`` without gradients with each ``(module, hook)`` registered as a forward
    pre-hook (it sees the module's inputs), and remove the hooks afterwards, also on an error."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            for images in batches:
                model(images)
    finally:
        for handle in handles:
            handle.remove()
