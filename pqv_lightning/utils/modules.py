"""Copies of a model for the work that runs beside training: measuring, quantizing, exporting."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

__all__ = ["cpu_float_copy"]


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
