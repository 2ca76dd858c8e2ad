"""Outlier smoothing: per-channel scales moved from an activation into the layers that consume it, exact in float.

A ViT's linear layers see a few input channels far larger than the rest, and per-tensor INT8 activations round the
rest away. Where an activation reaches its consumers through operations that are linear per channel, dividing its
channel ``c`` by ``s_c`` and multiplying input channel ``c`` of every consumer's weight by ``s_c`` computes the same
function while the activation's range shrinks (SmoothQuant, Xiao et al. 2023). Three rewrites:

* ``norm``: a normalization's affine (weight and bias) ``/ s`` -> its consumers ``* s`` (LayerNorm into ``qkv`` and
  ``fc1``, GroupNorm / LayerNorm2d into convolutions, ...);
* ``value``: the value rows of an attention's ``qkv`` (or ``v``) projection and its value bias ``/ s`` -> the output
  projection ``* s`` (attention mixes tokens, not channels; a ReLU on the values, as in MobileViTV2, commutes);
* ``mlp``: the rows of an MLP's first layer ``/ s`` -> the second layer ``* s``, only across an activation that
  commutes with positive scales (ReLU, LeakyReLU, identity) or through the linear half of a gated MLP (SwiGLU,
  GLU); never across GELU / SiLU / Hardswish, where it would not be exact.

The couplings are found on the model (a consumer whose input has the same per-channel sums as a norm's output is
fed by it, whatever the token order, windowing or zero padding in between; attention and MLP modules by their
layer names) and each is then tried with random scales: it is kept only if the logits stay within float rounding.
A family the rules did not foresee is therefore left unsmoothed, never changed. The strength ``alpha``
(``s_c = max|X_c|^alpha / max|W_c|^(1 - alpha)``, SmoothQuant's rule) is chosen per coupling from calibration data:
the ``alpha``, or no smoothing at all, whose simulated W8A8 error of the consumers' outputs (per-tensor activations,
per-channel symmetric weights: the scheme every INT8 path of this toolkit uses for linear layers) is smallest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pqv_lightning.utils.batches import collect_images
from pqv_lightning.utils.checks import check_int, invalid
from pqv_lightning.utils.modules import cpu_float_copy, run_with_input_hooks

__all__ = ["ALPHAS", "Coupling", "SmoothedCoupling", "SmoothingResult", "find_couplings", "smooth_outliers"]

#: The migration strengths tried per coupling (besides leaving it as it is).
ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Activations commuting with positive per-channel scales: an MLP's two layers can exchange scales across them.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)
#: Rows of the calibration activations each coupling keeps for its error estimate.
_SAMPLE_ROWS = 512


@dataclass(frozen=True)
class Coupling:
    """One place where scales can move: ``producer``'s output channels (``rows`` of its weight, or a norm's affine)
    feed the input channels of ``consumers``; ``extras`` are further parameters scaled with the producer (a separate
    value bias)."""

    kind: str
    producer: str
    consumers: tuple[str, ...]
    rows: tuple[int, ...] | None = None
    extras: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.producer} -> {', '.join(self.consumers)}"

    def apply(self, model: nn.Module, scale: Tensor) -> None:
        """Divide the producer's output channels by ``scale`` and multiply the consumers' input channels by it."""
        producer = model.get_submodule(self.producer)
        with torch.no_grad():
            s = scale.to(producer.weight.dtype)
            if self.kind == "norm":
                producer.weight.div_(s)
                if producer.bias is not None:
                    producer.bias.div_(s)
            else:
                rows = torch.arange(_out_channels(producer)) if self.rows is None else torch.tensor(self.rows)
                shape = (-1,) + (1,) * (producer.weight.dim() - 1)
                producer.weight.index_copy_(0, rows, producer.weight.index_select(0, rows) / s.view(shape))
                if producer.bias is not None:
                    producer.bias.index_copy_(0, rows, producer.bias.index_select(0, rows) / s)
            for extra in self.extras:
                tensor = model.get_parameter(extra) if _is_parameter(model, extra) else _buffer(model, extra)
                tensor.div_(s)
            for name in self.consumers:
                weight = model.get_submodule(name).weight
                weight.mul_(s.view((1, -1) + (1,) * (weight.dim() - 2)))


@dataclass(frozen=True)
class SmoothedCoupling:
    """What smoothing did at one coupling: the chosen ``alpha`` (``None``: left as it was) and the simulated W8A8
    relative error of the consumers' outputs before and after."""

    coupling: Coupling
    alpha: float | None
    error_before: float
    error_after: float
    largest_ratio: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.coupling.kind,
            "producer": self.coupling.producer,
            "consumers": list(self.coupling.consumers),
            "alpha": self.alpha,
            "error_before": self.error_before,
            "error_after": self.error_after,
            "activation_outlier_ratio": self.largest_ratio,
        }


@dataclass
class SmoothingResult:
    """A smoothed copy of a model and what was done to it.

    ``couplings`` lists every exact coupling found (smoothed or not), ``refused`` the candidates that were not exact
    (``(name, why)``), ``logit_change`` the largest change of the logits on the calibration images (float rounding).
    """

    model: nn.Module
    couplings: list[SmoothedCoupling] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    logit_change: float = 0.0

    @property
    def smoothed(self) -> list[SmoothedCoupling]:
        return [c for c in self.couplings if c.alpha is not None]

    @property
    def smoothed_layers(self) -> list[str]:
        """The consumers whose inputs were smoothed (the layers that quantize differently)."""
        return [name for c in self.smoothed for name in c.coupling.consumers]

    def summary(self) -> str:
        if not self.couplings:
            return "no exact coupling found: nothing smoothed"
        worst = max(self.couplings, key=lambda c: c.error_before)
        return (
            f"{len(self.smoothed)} of {len(self.couplings)} couplings smoothed ({len(self.smoothed_layers)} layers); "
            f"largest simulated W8A8 error {worst.error_before:.3g} -> {worst.error_after:.3g} at "
            f"{worst.coupling.name}; logits changed by {self.logit_change:.2e}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "smoothed_layers": self.smoothed_layers,
            "couplings": [c.as_dict() for c in self.couplings],
            "refused": [{"coupling": name, "why": why} for name, why in self.refused],
            "logit_change": self.logit_change,
        }


# --------------------------------------------------------------------------- finding the couplings


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        "norm" in type(module).__name__.lower()
        and not any(True for _ in module.children())
        and isinstance(weight, Tensor)
        and weight.dim() == 1
        and (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape))
    )


def _norm_channel_dim(module: nn.Module) -> int:
    """Where a norm's output keeps its channels: last for LayerNorm / RMSNorm, 1 for the 2-D and batch norms."""
    name = type(module).__name__.lower()
    channel_first = "2d" in name or isinstance(module, nn.GroupNorm | nn.modules.batchnorm._BatchNorm)
    return 1 if channel_first else -1


def _is_consumer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _consumer_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _channels_last(x: Tensor, dim: int) -> Tensor:
    """``x`` as ``[rows, channels]`` with the channels taken from ``dim``."""
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _channel_sums(x: Tensor, dim: int) -> Tensor:
    rows = _channels_last(x.detach().double(), dim)
    return torch.stack([rows.sum(0), rows.square().sum(0)])


def _module_couplings(model: nn.Module) -> list[list[Coupling]]:
    """The value and MLP couplings, by the layer names of timm's attention and MLP modules; each entry lists the
    alternatives (value rows stacked ``[q, k, v]`` or interleaved per head), the first exact one is taken."""
    found: list[list[Coupling]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""

        def child(*attrs: str, module: nn.Module = module, prefix: str = prefix) -> tuple[str, nn.Module] | None:
            for attr in attrs:
                sub = getattr(module, attr, None)
                if isinstance(sub, nn.Module) and _is_consumer(sub):
                    return f"{prefix}{attr}", sub
            return None

        out = child("proj", "out_proj")
        if out is not None:
            out_name, width = out[0], _in_channels(out[1])
            extras = tuple(f"{prefix}{p}" for p in ("v_bias",) if isinstance(getattr(module, p, None), Tensor))
            qkv, v = child("qkv", "qkv_proj"), child("v", "v_proj")
            if qkv is not None and _out_channels(qkv[1]) > width:
                found.append([
                    Coupling("value", qkv[0], (out_name,), rows, extras)
                    for rows in _value_rows(_out_channels(qkv[1]), width, getattr(module, "num_heads", None))
                ])  # fmt: skip
            elif v is not None and _out_channels(v[1]) == width:
                found.append([Coupling("value", v[0], (out_name,), None, extras)])
        fc2 = child("fc2")
        norm = getattr(module, "norm", None)
        if fc2 is None or (norm is not None and not isinstance(norm, nn.Identity)):
            continue
        width = _in_channels(fc2[1])
        fc1, fc1_x = child("fc1"), child("fc1_x")
        if fc1_x is not None and _out_channels(fc1_x[1]) == width:  # SwiGLU: act(fc1_g(x)) * fc1_x(x)
            found.append([Coupling("mlp", fc1_x[0], (fc2[0],))])
        elif fc1 is not None and _out_channels(fc1[1]) == 2 * width:  # GLU: one half is linear
            halves = [tuple(range(width)), tuple(range(width, 2 * width))]
            found.append([Coupling("mlp", fc1[0], (fc2[0],), rows) for rows in halves])
        elif (
            fc1 is not None
            and _out_channels(fc1[1]) == width
            and isinstance(getattr(module, "act", None), _HOMOGENEOUS)
        ):
            found.append([Coupling("mlp", fc1[0], (fc2[0],))])
    return found


def _value_rows(outputs: int, width: int, heads: int | None) -> list[tuple[int, ...]]:
    """Where the values may sit in a fused projection of ``outputs`` rows: the last ``width`` rows (``[q, k, v]``,
    or MobileViTV2's ``[query, k, v]``), or the last ``width / heads`` rows of each head's chunk (TinyViT, LeViT,
    EfficientFormer: ``[q_h, k_h, v_h]`` per head)."""
    layouts = [tuple(range(outputs - width, outputs))]
    if isinstance(heads, int) and heads > 1 and outputs % heads == 0 and width % heads == 0:
        chunk, per_head = outputs // heads, width // heads
        layouts.append(tuple(h * chunk + chunk - per_head + i for h in range(heads) for i in range(per_head)))
    return layouts


def _norm_couplings(model: nn.Module, images: Tensor) -> list[Coupling]:
    """Norms and the consumers whose inputs are their outputs (same per-channel sums, within float rounding)."""
    norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
    consumers = {n: m for n, m in model.named_modules() if _is_consumer(m)}
    outputs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    handles = []

    def keep(store: dict[str, Tensor], name: str, x: Tensor, dim: int) -> None:
        sums = _channel_sums(x, dim)
        store[name] = store[name] + sums if name in store and store[name].shape == sums.shape else sums

    for name, module in norms.items():
        dim = _norm_channel_dim(module)
        handles.append(module.register_forward_hook(lambda m, a, out, n=name, d=dim: keep(outputs, n, out, d)))
    for name, module in consumers.items():
        dim = _consumer_dim(module)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name, d=dim: keep(inputs, n, a[0], d)))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for name, norm in norms.items():
        if name not in outputs or outputs[name].shape[1] != norm.weight.numel():
            continue
        reference = outputs[name]
        matched = tuple(
            c
            for c, sums in inputs.items()
            if sums.shape == reference.shape
            and torch.allclose(sums, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()) + 1e-12)
        )
        if matched:
            found.append(Coupling("norm", name, matched))
    return found


def find_couplings(model: nn.Module, images: Tensor) -> tuple[list[Coupling], list[tuple[str, str]]]:
    """The exact couplings of ``model`` (eval mode) and the refused candidates with why.

    Every candidate is tried with random scales in ``[e^-3, e^3]`` on ``images``: kept if the logits move by no more
    than float rounding. The model is left as it was.
    """
    groups = [[c] for c in _norm_couplings(model, images)] + _module_couplings(model)
    groups = [
        alternatives for alternatives in ([c for c in g if _channels_agree(model, c)] for g in groups) if alternatives
    ]
    with torch.no_grad():
        reference = model(images)
    generator = torch.Generator().manual_seed(0)
    scales = {
        c: torch.exp(torch.empty(_width(model, c)).uniform_(-3, 3, generator=generator)) for g in groups for c in g
    }
    firsts = [g[0] for g in groups]
    if _exact(model, firsts, scales, images, reference):
        return firsts, []
    kept, refused = [], []
    for alternatives in groups:  # one at a time, to name the ones that are not exact
        exact = next((c for c in alternatives if _exact(model, [c], scales, images, reference)), None)
        if exact is not None:
            kept.append(exact)
        else:
            refused.append((alternatives[0].name, "the logits change under random scales (a non-linear path between)"))
    return kept, refused


def _channels_agree(model: nn.Module, coupling: Coupling) -> bool:
    width = _width(model, coupling)
    return all(_in_channels(model.get_submodule(c)) == width for c in coupling.consumers)


def _width(model: nn.Module, coupling: Coupling) -> int:
    if coupling.rows is not None:
        return len(coupling.rows)
    producer = model.get_submodule(coupling.producer)
    return producer.weight.numel() if coupling.kind == "norm" else _out_channels(producer)


def _exact(model: nn.Module, couplings: Sequence[Coupling], scales: dict, images: Tensor, reference: Tensor) -> bool:
    saved = _snapshot(model, couplings)
    try:
        for coupling in couplings:
            coupling.apply(model, scales[coupling])
        with torch.no_grad():
            changed = float((model(images) - reference).abs().max())
    finally:
        _restore(model, saved)
    return changed <= _tolerance(reference)


def _tolerance(reference: Tensor) -> float:
    return 2e-5 * float(reference.abs().max()) + 1e-6


# --------------------------------------------------------------------------- applying scales


def _parameters_of(model: nn.Module, coupling: Coupling) -> list[Tensor]:
    names = [coupling.producer, *coupling.consumers]
    tensors = [p for n in names for p in (model.get_submodule(n).weight, model.get_submodule(n).bias) if p is not None]
    return tensors + [model.get_parameter(e) if _is_parameter(model, e) else _buffer(model, e) for e in coupling.extras]


def _is_parameter(model: nn.Module, name: str) -> bool:
    return name in dict(model.named_parameters())


def _buffer(model: nn.Module, name: str) -> Tensor:
    parent, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, attr)


def _snapshot(model: nn.Module, couplings: Sequence[Coupling]) -> list[tuple[Tensor, Tensor]]:
    seen: dict[int, tuple[Tensor, Tensor]] = {}
    for coupling in couplings:
        for tensor in _parameters_of(model, coupling):
            seen.setdefault(id(tensor), (tensor, tensor.detach().clone()))
    return list(seen.values())


def _restore(model: nn.Module, saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for tensor, value in saved:
            tensor.copy_(value)


# --------------------------------------------------------------------------- choosing the strength


@dataclass
class _Activations:
    """Per-channel range and a sample of rows of one coupling's consumer input, over the calibration batches."""

    low: Tensor | None = None
    high: Tensor | None = None
    rows: list[Tensor] = field(default_factory=list)

    def add(self, x: Tensor, dim: int, generator: torch.Generator) -> None:
        flat = _channels_last(x.detach().float(), dim)
        low, high = flat.min(0).values, flat.max(0).values
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        take = torch.randperm(flat.shape[0], generator=generator)[: _SAMPLE_ROWS // 4]
        self.rows.append(flat[take].clone())

    def sample(self) -> Tensor:
        rows = torch.cat(self.rows)
        return rows[:: max(1, rows.shape[0] // _SAMPLE_ROWS)][:_SAMPLE_ROWS]


def _collect(model: nn.Module, couplings: Sequence[Coupling], batches: Sequence[Tensor]) -> list[_Activations]:
    stats = [_Activations() for _ in couplings]
    generator = torch.Generator().manual_seed(0)
    hooks = []
    for coupling, stat in zip(couplings, stats, strict=True):
        first = model.get_submodule(coupling.consumers[0])
        dim = _consumer_dim(first)
        hooks.append((first, lambda m, a, s=stat, d=dim: s.add(a[0], d, generator)))
    run_with_input_hooks(model, hooks, batches)
    return stats


def _fake_quant_activation(x: Tensor, low: float, high: float) -> Tensor:
    """Asymmetric 8-bit, one scale for the tensor (the static INT8 activations of the layers)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / 255
    zero = round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_weight(weight: Tensor) -> Tensor:
    """Symmetric 8-bit, one scale per output channel."""
    scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def _as_rows(weight: Tensor) -> Tensor:
    """A weight as ``[outputs, input channels]`` rows (a k x k convolution: one row per output and tap)."""
    return weight if weight.dim() == 2 else weight.movedim(1, -1).reshape(-1, weight.shape[1])


def _error(x: Tensor, low: Tensor, high: Tensor, weights: Sequence[Tensor], exact: Sequence[Tensor], scale: Tensor):
    """The relative squared error of the consumers' outputs with ``x / scale`` and ``weight * scale`` in W8A8."""
    lo, hi = float((low / scale).min()), float((high / scale).max())
    quantized_x = _fake_quant_activation(x / scale, lo, hi)
    error = total = 0.0
    for weight, reference in zip(weights, exact, strict=True):
        shape = (1, -1) + (1,) * (weight.dim() - 2)
        approx = quantized_x @ _as_rows(_fake_quant_weight(weight * scale.view(shape))).T
        error += float((approx - reference).square().sum())
        total += float(reference.square().sum())
    return error / max(total, 1e-30)


def _weight_channel_max(weights: Sequence[Tensor]) -> Tensor:
    return torch.stack([w.abs().movedim(1, 0).reshape(w.shape[1], -1).amax(1) for w in weights]).amax(0)


def _choose(model: nn.Module, coupling: Coupling, stat: _Activations, alphas: Sequence[float]):
    """(alpha or None, scale, error before, error after, outlier ratio) of one coupling."""
    weights = [model.get_submodule(c).weight.detach().float() for c in coupling.consumers]
    x = stat.sample()
    activation_max = torch.maximum(stat.low.abs(), stat.high.abs()).clamp_min(1e-5)
    weight_max = _weight_channel_max(weights).clamp_min(1e-5)
    ratio = float(activation_max.max() / activation_max.median().clamp_min(1e-12))
    identity = torch.ones_like(activation_max)
    exact = [x @ _as_rows(w).T for w in weights]
    best = (None, identity, _error(x, stat.low, stat.high, weights, exact, identity))
    before = best[2]
    for alpha in alphas:
        scale = activation_max.double().pow(alpha) / weight_max.double().pow(1 - alpha)
        scale = (scale / torch.exp(torch.log(scale).mean())).float()  # geometric mean 1: magnitudes stay as they were
        error = _error(x, stat.low, stat.high, weights, exact, scale)
        if error < best[2]:
            best = (alpha, scale, error)
    return best[0], best[1], before, best[2], ratio


# --------------------------------------------------------------------------- the entry point


def smooth_outliers(
    model: nn.Module,
    calibration: Iterable[Any],
    calibration_batches: int | None = 8,
    alphas: Sequence[float] = ALPHAS,
) -> SmoothingResult:
    """A smoothed CPU float copy of ``model`` (the same function) whose linear layers quantize better; see the module.

    ``calibration``: image tensors or ``(images, labels)`` batches; the first ``calibration_batches`` are used to
    choose each coupling's strength among ``alphas`` (or none). The input model is not modified.

    Raises:
        InvalidArgumentError: ``alphas`` not in (0, 1), or a bad ``calibration_batches``.
        ValueError: no calibration batch.
        RuntimeError: the smoothed model's logits differ from the model's beyond float rounding (a bug: please
            report it with the model's name).

    Example::

        result = smooth_outliers(model, calibration=[images])
        variant = quantize(result.model, "int8_pt2e:xnnpack", images[:1], calibration=[images])
    """
    check_int("calibration_batches", calibration_batches, 1, allow_none=True)
    alphas = tuple(alphas)
    if not alphas or not all(isinstance(a, int | float) and 0 < a < 1 for a in alphas):
        raise invalid("alphas", list(alphas), "numbers in (0, 1), at least one")
    batches = collect_images(calibration, calibration_batches, "smoothing chooses its scales on calibration images")
    work = cpu_float_copy(model).eval()
    probe = batches[0][: min(4, batches[0].shape[0])]
    couplings, refused = find_couplings(work, probe)
    stats = _collect(work, couplings, batches)
    with torch.no_grad():
        reference = work(probe)
    chosen = []
    for coupling, stat in zip(couplings, stats, strict=True):
        alpha, scale, before, after, ratio = _choose(work, coupling, stat, alphas)
        if alpha is not None:
            coupling.apply(work, scale)
        chosen.append(SmoothedCoupling(coupling, alpha, before, after, ratio))
    with torch.no_grad():
        change = float((work(probe) - reference).abs().max())
    if change > 10 * _tolerance(reference) or not math.isfinite(change):
        raise RuntimeError(
            f"smoothing changed {type(model).__name__}'s logits by {change:.3g} (float rounding allows "
            f"{10 * _tolerance(reference):.3g}): an inexact coupling slipped through; please report it."
        )
    return SmoothingResult(work, chosen, refused, change)
