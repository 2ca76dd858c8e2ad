"""Calibration-driven weight rounding (GPTQ) and bias correction, on the weight grid each runtime derives itself.

Round-to-nearest puts every weight on the closest grid point independently. GPTQ (Frantar et al., ICLR 2023) rounds
the input columns of a layer one after the other and spreads each rounding error over the columns not rounded yet,
weighted by the inverse Hessian ``(X^T X)^-1`` of the layer's calibration inputs, so the *output* error is what is
minimised. It is chosen over AdaRound because it needs no optimisation loop (one Cholesky factorisation and a sweep
over the columns per layer: seconds per layer of deit_small on a CPU) and it handles 4-bit groups directly; bias
correction then removes what is left of the output's mean shift: ``b += (W - W_q) E[x]`` (layers with a bias).

Every runtime here quantizes the float weights it is handed by itself (PT2E observers, torch.ao observers, torchao):
``scale = max|w| / divisor`` per output channel (or per group, or per tensor), then ``round(w / scale)`` clamped to
``[qmin, qmax]``. The rounded model is therefore written as a *float* model that lands exactly on the chosen integers
under that rule: every weight is stored as ``q * scale``, except the largest weight of each channel (or group),
which keeps its original value so that the runtime finds the same ``scale``; GPTQ rounds that anchor the way the
runtime will and compensates its error like any other. The grids of the registered targets are in :data:`GRIDS`;
``tests/test_rounding.py`` checks each against the runtime's own quantized weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pqv_lightning.quantization.targets import QuantizationTarget
from pqv_lightning.utils.batches import collect_images
from pqv_lightning.utils.checks import check_bool, check_choice, check_int, invalid
from pqv_lightning.utils.modules import cpu_float_copy, run_with_input_hooks

__all__ = ["GRIDS", "ROUNDINGS", "RoundingResult", "WeightGrid", "grid_for", "round_weights"]

#: ``"nearest"``: what the runtime does by itself; ``"gptq"``: error-compensating rounding (this module).
ROUNDINGS: tuple[str, ...] = ("nearest", "gptq")
#: Calibration rows (tokens) per layer and batch that enter the Hessian: enough for a 384-1536-wide layer.
_ROWS_PER_BATCH = 4096


@dataclass(frozen=True)
class WeightGrid:
    """How a runtime quantizes a layer's weights: symmetric, ``scale = max|w| / divisor`` over one output channel
    (``group_size=None``), a group of ``group_size`` input channels (per channel where the width is not a multiple),
    or the whole tensor (``group_size=0``); integers clamped to ``[qmin, qmax]``.

    The largest weight of a group sits exactly at ``divisor`` steps. With a ``.5`` divisor that is a tie: a positive
    one is clamped to ``qmax`` either way, a negative one goes to either neighbour by float rounding (torchao and the
    PT2E x86 observers, measured in ``tests/test_rounding.py``), so GPTQ takes the midpoint there and may be off by
    half a step at that one weight."""

    name: str
    qmin: int
    qmax: int
    divisor: float
    group_size: int | None = None

    @property
    def inner_range(self) -> tuple[int, int]:
        """The integers any weight but a group's largest may take: within its magnitude, so it cannot move the scale."""
        inner = math.floor(self.divisor)
        return max(self.qmin, -inner), min(self.qmax, inner)

    @property
    def anchors(self) -> tuple[float, float]:
        """What the runtime gives the largest negative and positive weight of a group (a tie: its midpoint)."""
        return -self.divisor, float(min(math.ceil(self.divisor), self.qmax))

    def groups(self, in_features: int) -> int:
        """The input width of one scale group of a layer ``in_features`` wide (0: per tensor)."""
        if self.group_size == 0:
            return 0
        if self.group_size and in_features % self.group_size == 0:
            return self.group_size
        return in_features


_INT8_XNNPACK = WeightGrid("int8 per channel, [-127, 127], max/127 (XNNPACKQuantizer)", -127, 127, 127.0)
_INT8_X86 = WeightGrid("int8 per channel, [-128, 127], max/127.5 (x86 / fbgemm / onednn observers)", -128, 127, 127.5)
_INT8_TENSOR = WeightGrid("int8 per tensor, [-128, 127], max/127.5 (torch.ao per-tensor observer)", -128, 127, 127.5, 0)
_INT4 = WeightGrid("int4 in groups of 32, [-8, 7], max/7.5 (torchao IntxWeight)", -8, 7, 7.5, 32)

#: The weight grid of each target (``"method:backend"``) whose runtime takes rounded weights as they are.
GRIDS: dict[str, WeightGrid] = {
    "int8_pt2e:xnnpack": _INT8_XNNPACK,
    "int8_pt2e:x86": _INT8_X86,
    "int8_static:x86": _INT8_X86,
    "int8_static:fbgemm": _INT8_X86,
    "int8_static:onednn": _INT8_X86,
    "int8_static:qnnpack": _INT8_TENSOR,
    **{f"int8_dynamic:{engine}": _INT8_TENSOR for engine in ("x86", "fbgemm", "qnnpack", "onednn")},
    "int4_weight:xnnpack": _INT4,
}


def grid_for(target: QuantizationTarget | str, int4_group_size: int = 32) -> WeightGrid:
    """The weight grid ``target``'s runtime derives; an argument error naming the targets that have one."""
    target = QuantizationTarget.parse(target) if isinstance(target, str) else target
    grid = GRIDS.get(f"{target.method}:{target.backend}")
    if grid is None:
        raise invalid("target", str(target), f"a target with integer weights: {', '.join(GRIDS)}")
    if grid is _INT4 and int4_group_size != grid.group_size:
        grid = WeightGrid(grid.name.replace("32", str(int4_group_size)), -8, 7, 7.5, int4_group_size)
    return grid


@dataclass
class RoundingResult:
    """A float copy of a model whose linear weights sit on ``grid`` as chosen by ``rounding``, and per layer the
    relative output error on the calibration data (nearest rounding vs the chosen one)."""

    model: nn.Module
    grid: WeightGrid
    rounding: str
    bias_correction: bool
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.errors:
            return f"{self.rounding} rounding: no layer"
        before = sum(e[0] for e in self.errors.values()) / len(self.errors)
        after = sum(e[1] for e in self.errors.values()) / len(self.errors)
        corrected = " + bias correction" if self.bias_correction else ""
        return (
            f"{self.rounding}{corrected} on {len(self.errors)} layers ({self.grid.name}): mean relative output error "
            f"{before:.3g} (nearest) -> {after:.3g} ({self.seconds:.1f} s)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounding": self.rounding,
            "bias_correction": self.bias_correction,
            "grid": self.grid.name,
            "layers": {name: {"nearest": a, "rounded": b} for name, (a, b) in self.errors.items()},
        }


@dataclass
class _Inputs:
    """``X^T X``, the sum of the rows and their count for one layer's calibration inputs."""

    hessian: Tensor
    total: Tensor
    rows: int = 0

    def add(self, x: Tensor, generator: torch.Generator) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if flat.shape[0] > _ROWS_PER_BATCH:
            flat = flat[torch.randperm(flat.shape[0], generator=generator)[:_ROWS_PER_BATCH]]
        self.hessian += flat.T @ flat
        self.total += flat.sum(0)
        self.rows += flat.shape[0]


def _collect(model: nn.Module, layers: dict[str, nn.Linear], batches: Sequence[Tensor]) -> dict[str, _Inputs]:
    stats = {n: _Inputs(torch.zeros(m.in_features, m.in_features, dtype=torch.float64),
                        torch.zeros(m.in_features, dtype=torch.float64)) for n, m in layers.items()}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    hooks = [(m, lambda _, a, s=stats[n]: s.add(a[0], generator)) for n, m in layers.items()]
    run_with_input_hooks(model, hooks, batches)
    return stats


def _scales_and_anchors(weight: Tensor, grid: WeightGrid) -> tuple[Tensor, Tensor]:
    """Per element: the scale the runtime will derive (``[O, I]``), and the anchors (the largest weight of each
    scale group, kept at its value so that the runtime finds that scale)."""
    rows, width = weight.shape
    group = grid.groups(width)
    magnitude = weight.abs()
    if group == 0:
        blocks = magnitude.reshape(1, -1)
    else:
        blocks = magnitude.reshape(rows, width // group, group).reshape(-1, group)
    largest, where = blocks.max(dim=1)
    scale = (largest / grid.divisor).clamp_min(torch.finfo(torch.float32).tiny)
    anchor = torch.zeros_like(blocks, dtype=torch.bool)
    anchor[torch.arange(blocks.shape[0]), where] = True
    scale = scale[:, None].expand_as(blocks)
    return scale.reshape(rows, width), anchor.reshape(rows, width)


def _anchor_values(weight: Tensor, grid: WeightGrid) -> Tensor:
    """The integer the runtime gives each weight if it is its group's anchor (by its sign)."""
    negative, positive = grid.anchors
    return torch.where(weight < 0, float(negative), float(positive)).to(weight.dtype)


def _round(weight: Tensor, scale: Tensor, anchor: Tensor, grid: WeightGrid) -> Tensor:
    """The integers the runtime stores: an anchor as the runtime rounds it, every other weight within the anchor's
    magnitude (so that it cannot change the scale)."""
    plain = torch.clamp(torch.round(weight / scale), *grid.inner_range)
    return torch.where(anchor, _anchor_values(weight, grid), plain)


def _gptq(weight: Tensor, hessian: Tensor, scale: Tensor, anchor: Tensor, grid: WeightGrid, block: int = 128):
    """GPTQ's column sweep with lazy block updates; returns the integers (``[O, I]``, float64)."""
    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += 0.01 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    anchor_q = _anchor_values(weight, grid)
    low, high = grid.inner_range
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column, s = w_block[:, i], scale[:, start + i]
            rounded = torch.clamp(torch.round(column / s), low, high)
            rounded = torch.where(anchor[:, start + i], anchor_q[:, start + i], rounded)
            q[:, start + i] = rounded
            error = (column - rounded * s) / inv[i, i]
            w_block[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return q


def _relative_error(weight: Tensor, effective: Tensor, stats: _Inputs) -> float:
    """``||X (W - W_q)^T||^2 / ||X W^T||^2`` from the layer's ``X^T X``."""
    delta = weight - effective
    error = torch.einsum("oi,ij,oj->", delta, stats.hessian, delta)
    total = torch.einsum("oi,ij,oj->", weight, stats.hessian, weight)
    return float(error / total.clamp_min(1e-30))


def round_weights(
    model: nn.Module,
    target: QuantizationTarget | str,
    calibration: Iterable[Any],
    rounding: str = "gptq",
    bias_correction: bool = True,
    calibration_batches: int | None = 8,
    skip: Sequence[str] = (),
    int4_group_size: int = 32,
) -> RoundingResult:
    """A float copy of ``model`` whose ``nn.Linear`` weights (all but those named in ``skip``) are rounded for
    ``target``'s weight grid, with the biases corrected for the mean output shift; see the module docstring.

    ``calibration``: image tensors or ``(images, labels)`` batches; the first ``calibration_batches`` are run
    (in float: each layer sees the float model's inputs). The input model is not modified.

    Raises:
        InvalidArgumentError: a target without integer weights (fp16), an unknown ``rounding``, a bad number.
        ValueError: no calibration batch.

    Example::

        rounded = round_weights(model, "int4_weight", calibration=[images])
        variant = quantize(rounded.model, "int4_weight", images[:1])
    """
    start = time.perf_counter()
    check_choice("rounding", rounding, ROUNDINGS)
    check_bool("bias_correction", bias_correction)
    check_int("calibration_batches", calibration_batches, 1, allow_none=True)
    grid = grid_for(target, int4_group_size)
    batches = collect_images(calibration, calibration_batches, "weight rounding reads the layers' inputs from images")
    work = cpu_float_copy(model).eval()
    layers = {n: m for n, m in work.named_modules() if isinstance(m, nn.Linear) and n not in set(skip)}
    stats = _collect(work, layers, batches)
    errors = {}
    for name, layer in layers.items():
        inputs = stats[name]
        if inputs.rows == 0:  # never called on these images: left as it is
            continue
        weight = layer.weight.detach().double()
        scale, anchor = _scales_and_anchors(weight, grid)
        nearest = _round(weight, scale, anchor, grid)
        q = _gptq(weight, inputs.hessian, scale, anchor, grid) if rounding == "gptq" else nearest
        stored = torch.where(anchor, weight, q * scale)
        errors[name] = (_relative_error(weight, nearest * scale, inputs), _relative_error(weight, q * scale, inputs))
        with torch.no_grad():
            layer.weight.copy_(stored.to(layer.weight.dtype))
            if bias_correction and layer.bias is not None:  # a layer without a bias is left so (no new parameter)
                shift = (weight - q * scale) @ (inputs.total / inputs.rows)
                layer.bias.add_(shift.to(layer.bias.dtype))
    return RoundingResult(work, grid, rounding, bias_correction, errors, time.perf_counter() - start)
