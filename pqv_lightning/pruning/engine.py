"""Structured pruning of timm vision transformers with torch-pruning's DepGraph (no Lightning here)."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from . import structure as st
from .couplings import apply_couplings
from .families import Family, family_by_name, family_of, unit_inputs
from .importances import clear_statistics, collecting
from .spec import PruningResult, PruningSpec

_SEARCH_STEPS = 14


def check_supported(model: nn.Module, spec: PruningSpec | None = None) -> Family:
    """Raise UnsupportedModelError naming what cannot be pruned correctly; returns the model's family."""
    family = family_of(model)
    family.check(model, spec)
    if spec is not None:
        _resolve_ignored(model, spec)
        if spec.ratio is not None:
            family.check_ratio(model, spec, spec.ratio)
    return family


def _resolve_ignored(model: nn.Module, spec: PruningSpec) -> list[nn.Module]:
    modules = dict(model.named_modules())
    unknown = [n for n in spec.ignored_layers if n not in modules]
    if unknown:
        raise ValueError(
            f"ignored_layers {unknown} are not modules of the model; accepted: module names "
            f"such as {list(modules)[1:6]}"
        )
    return [modules[n] for n in spec.ignored_layers]


def _on_model(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on the device of ``model``'s parameters and, if floating, in their dtype.

    Callers hand the engine data as a loader yields it (float32, often on the CPU), while the model may already sit
    on a GPU or in another precision (``precision="bf16-true"`` / ``"64-true"`` converts the module, not the
    batches a callback reads), so every forward pass the engine makes takes its inputs through here.
    """
    param = next(model.parameters(), None)
    if param is None:
        return x
    dtype = param.dtype if x.is_floating_point() and param.is_floating_point() else None
    return x.to(device=param.device, dtype=dtype)


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, _on_model(example_inputs[:1], model))
    finally:
        model.train(was_training)
    return int(macs), int(params)


def _clear_caches(model: nn.Module) -> None:
    """Drop eval-mode caches (EfficientViT-M attention biases) that would keep autograd graphs alive."""
    for m in model.modules():
        cache = getattr(m, "attention_bias_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def _accumulate(
    model: nn.Module,
    spec: PruningSpec,
    importance: tp.importance.Importance,
    calibration: Iterable,
    loss_fn: Callable,
    grad_reduce: Callable | None,
) -> None:
    """Gradients (Taylor) or mean squared per-sample gradients (Hessian/OBD) in `p.grad`, rank-reduced; the
    activation / Fisher statistics of `importance` collected on the layers (see `importances.collecting`)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    sq: dict[nn.Parameter, torch.Tensor] = {}
    count = 0
    n_batches = 0
    try:
        model.eval()  # no dropout, no BatchNorm statistic updates: calibration must not change weights
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad(), collecting(model, importance):
            for x, y in itertools.islice(calibration, spec.calibration_batches):
                x = _on_model(x, model)
                y = y.to(x.device)
                _clear_caches(model)
                out = model(x)
                if spec.hessian:
                    for i in range(len(x)):
                        model.zero_grad(set_to_none=True)
                        loss_fn(out[i : i + 1], y[i : i + 1]).backward(retain_graph=i < len(x) - 1)
                        for p in params:
                            if p.grad is not None:
                                g2 = p.grad.detach().pow(2)
                                sq[p] = sq[p] + g2 if p in sq else g2
                        count += 1
                else:
                    loss_fn(out, y).backward()
                n_batches += 1
        if n_batches == 0:
            raise ValueError("calibration yielded no batches; accepted: an iterable of (inputs, targets).")
        if spec.hessian:
            for p in params:
                p.grad = sq[p] / count if p in sq else None
        if grad_reduce is not None:
            for p in params:
                if p.grad is not None:
                    p.grad = grad_reduce(p.grad)
    finally:
        _clear_caches(model)
        model.train(was_training)
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _prune_at(
    model: nn.Module,
    family: Family,
    spec: PruningSpec,
    ratio: float,
    example_inputs: torch.Tensor,
    ignored: list[nn.Module],
    importance: tp.importance.Importance,
) -> dict:
    """Prune `model` in place at `ratio`; return the structure (plain data)."""
    family.check_ratio(model, spec, ratio)
    shapes_before = st.shapes_of(model)
    before = family.before_surgery(model)
    ignored = ignored + family.heads(model)
    units = family.units(model, spec, ignored)
    inputs = unit_inputs(model, units, example_inputs)
    recorder = st.Recorder(model)
    head_ratio = ratio if spec.head_ratio is None else spec.head_ratio
    if ratio > 0:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            for unit, x in zip(units, inputs):
                was_training = unit.module.training
                unit.module.eval()
                pruner = tp.pruner.MetaPruner(
                    unit.module,
                    x,
                    importance=importance,
                    # torch-pruning ranks isomorphic scopes only under global pruning (locally it would apply one
                    # scope's top-k indices to every group of the scope)
                    global_pruning=spec.global_pruning or spec.isomorphic,
                    isomorphic=spec.isomorphic,
                    pruning_ratio=ratio,
                    ignored_layers=unit.ignored,
                    round_to=spec.round_to,
                    num_heads=unit.num_heads,
                    out_channel_groups={},  # torch-pruning's mutable default would keep every module alive
                    in_channel_groups={},
                    prune_num_heads=spec.prune_heads,
                    prune_head_dims=not spec.prune_heads,
                    head_pruning_ratio=head_ratio if spec.prune_heads else 0.0,
                )
                recorder.prefix = unit.prefix
                for group in pruner.step(interactive=True):
                    recorder.prune_group(group)
                unit.module.train(was_training)
        couplings = family.couplings(model, spec, ignored)
        if couplings:
            recorder.ops.extend(
                apply_couplings(
                    model,
                    couplings,
                    importance,
                    ratio,
                    head_ratio=head_ratio if spec.prune_heads else 0.0,
                    round_to=spec.round_to,
                    global_pruning=spec.global_pruning,
                    isomorphic=spec.isomorphic,
                )
            )
    extra = family.capture(model, units, spec, before)
    family.finalize(model, extra)
    st.drop_grads(model)
    return {
        "format": st.FORMAT,
        "version": st.VERSION,
        "family": family.name,
        "model_class": type(model).__name__,
        "ratio": float(ratio),
        "spec": spec.to_dict(),
        "shapes_before": shapes_before,
        "shapes_after": st.shapes_of(model),
        "ops": recorder.ops,
        "extra": extra,
    }


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Rebuild a recorded pruned structure in place on a dense model of the same config (no tracing).

    Applied to the same dense weights it reproduces `prune`'s model exactly (architecture and weights).
    """
    family = family_of(model)
    st.check_header(structure, family.name)
    family_by_name(structure["family"])
    st.check_shapes(model, structure["shapes_before"], "before pruning")
    st.replay_ops(model, structure["ops"])
    family.finalize(model, structure.get("extra", {}))
    st.check_shapes(model, structure["shapes_after"], "after pruning")


def _layer_widths(before: dict[str, int | None], model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        w0, w1 = before.get(name), st.out_width(m)
        if w0 is not None and w1 is not None and w0 != w1:
            out[name] = (w0, w1)
    return out


def prune(
    model: nn.Module,
    spec: PruningSpec,
    example_inputs: torch.Tensor,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable = F.cross_entropy,
    grad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PruningResult:
    """Prune `model` in place by `spec`; the result's `structure` replays it with `apply_structure`.

    Taylor / Hessian read `spec.calibration_batches` (x, y) batches from `calibration` (model in eval
    mode, so weights and BatchNorm statistics are untouched); `grad_reduce` is applied to every
    accumulated statistic before ranking (e.g. an all-reduce mean under DDP) so all ranks agree.
    A budget (`target_macs` / `target_params`) is met by bisection on the ratio, on copies of the model.

    Raises:
        InvalidArgumentError: a model family the engine refuses (with what prevents it), or an option the family
            does not take (e.g. ``prune_heads`` where heads are not separable).
        ValueError: a budget no ratio reaches, or data-driven importance without calibration batches.

    Example::

        result = prune(model, PruningSpec(ratio=0.25, importance="taylor"), images[:1], calibration=batches)
        fresh = timm.create_model(name, num_classes=10)
        apply_structure(fresh, result.structure)  # the same widths, replayed without tracing
    """
    if not isinstance(spec, PruningSpec):
        raise TypeError(f"spec must be a PruningSpec, got {type(spec).__name__}")
    family = check_supported(model, spec)
    ignored = _resolve_ignored(model, spec)
    if spec.data_driven and calibration is None:
        raise ValueError(
            f"importance={spec.to_dict()['importance']!r} needs calibration batches; pass "
            "calibration=an iterable of (inputs, targets), or use importance 'l1', 'l2' or 'random'."
        )
    example_inputs = _on_model(example_inputs, model)
    macs_before, params_before = count_macs_params(model, example_inputs)
    widths_before = {n: st.out_width(m) for n, m in model.named_modules()}
    importance = spec.make_importance()
    try:
        if spec.data_driven:
            _accumulate(model, spec, importance, calibration, loss_fn, grad_reduce)
        if spec.ratio is not None:
            structure = _prune_at(model, family, spec, spec.ratio, example_inputs, ignored, importance)
        else:
            structure = _search(model, family, spec, example_inputs, ignored, macs_before, params_before, importance)
            apply_structure(model, structure)
    finally:
        st.drop_grads(model)
        clear_statistics(model)
    macs_after, params_after = count_macs_params(model, example_inputs)
    return PruningResult(
        structure=structure,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        layer_widths=_layer_widths(widths_before, model),
        ratio=structure["ratio"],
    )


def _search(
    model: nn.Module,
    family: Family,
    spec: PruningSpec,
    example_inputs: torch.Tensor,
    ignored: list[nn.Module],
    macs0: int,
    params0: int,
    importance: tp.importance.Importance,
) -> dict:
    """Smallest ratio whose pruned copy meets the budget (importance statistics reused via `.grad` and the
    statistics on the layers, which the copies carry)."""
    metric, target = _budget(spec)
    names = {id(m): n for n, m in model.named_modules()}

    def trial(r: float) -> tuple[dict, int]:
        return _trial(model, family, spec, r, example_inputs, [names[id(m)] for m in ignored], metric, importance)

    if (macs0 if metric == "macs" else params0) <= target:
        return trial(0.0)[0]

    hi = _largest_ratio(model, family, spec)
    best = trial(hi) if hi > 0 else None
    if best is None or best[1] > target:
        raise _unreachable(spec, hi, best[1] if best is not None else (macs0 if metric == "macs" else params0))
    lo = 0.0
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        candidate = trial(mid)
        if candidate[1] <= target:
            hi, best = mid, candidate
        else:
            lo = mid
    return best[0]


def _budget(spec: PruningSpec) -> tuple[str, float]:
    """The budget's metric ("macs" or "params") and its target."""
    return ("macs", spec.target_macs) if spec.target_macs is not None else ("params", spec.target_params)


def _largest_ratio(model: nn.Module, family: Family, spec: PruningSpec) -> float:
    """The largest ratio the family accepts on this model (each group keeps at least one channel); 0 if none."""
    w = family.min_width(model, spec)
    hi = (w - 1) / w
    while hi > 0:
        try:
            family.check_ratio(model, spec, hi)
            break
        except ValueError:
            hi -= 1 / w
    return max(hi, 0.0)


def largest_ratio(model: nn.Module, spec: PruningSpec) -> float:
    """The largest ``ratio`` this model can be pruned by with ``spec``'s settings (each group keeps a channel)."""
    return _largest_ratio(model, check_supported(model, spec), spec)


def _unreachable(spec: PruningSpec, ratio: float, reached: int) -> ValueError:
    metric, target = _budget(spec)
    return ValueError(
        f"target_{metric}={target:g} is unreachable: the most this model can be pruned "
        f"(ratio {ratio:.4g}) leaves {reached} {metric}; accepted: a budget >= {reached}."
    )


def check_budget(model: nn.Module, spec: PruningSpec, example_inputs: torch.Tensor) -> None:
    """Refuse a budget (`target_macs` / `target_params`) that pruning cannot reach, before any training.

    With each group pruned by the same ratio, how many channels go at the largest ratio does not depend on the
    importance, so one magnitude-ranked trial on a copy gives the smallest reachable size without calibration
    data. Global and isomorphic ranking size the groups by the importance: their budgets are checked when they
    prune (as before).
    """
    if spec.ratio is not None or spec.global_pruning or spec.isomorphic:
        return
    family = check_supported(model, spec)
    metric, target = _budget(spec)
    example_inputs = _on_model(example_inputs, model)
    macs0, params0 = count_macs_params(model, example_inputs)
    if (macs0 if metric == "macs" else params0) <= target:
        return
    hi = _largest_ratio(model, family, spec)
    reached = macs0 if metric == "macs" else params0
    if hi > 0:
        probe = replace(spec, importance="l2")
        _, reached = _trial(
            model, family, probe, hi, example_inputs, list(probe.ignored_layers), metric, probe.make_importance()
        )
    if reached > target:
        raise _unreachable(spec, hi, reached)


def _trial(model, family, spec, ratio, example_inputs, ignored_names, metric, importance) -> tuple[dict, int]:
    clone = copy.deepcopy(model)
    for p, q in zip(model.parameters(), clone.parameters()):
        q.grad = p.grad
    mods = dict(clone.named_modules())
    ignored = [mods[n] for n in ignored_names]
    structure = _prune_at(clone, family, spec, ratio, example_inputs, ignored, importance)
    if metric == "macs":
        value = count_macs_params(clone, example_inputs)[0]
    else:
        value = sum(p.numel() for p in clone.parameters())
    return structure, value
