"""Quantization-aware training: a fake-quantized copy of a model to train, and its conversion to the real thing.

Two targets, each with the QAT API its PTQ path comes from:

* ``int8_pt2e:xnnpack``: ``torch.export`` -> torchao ``prepare_qat_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``
  (``get_symmetric_quantization_config(is_qat=True)``: per-channel weights, static per-tensor activations whose
  ranges moving-average observers learn during training) -> ``convert_pt2e``: the Q/DQ graph the ``.pte`` lowers.
  The observers and fake quantizers are submodules with buffers, so their state is in the model's ``state_dict``.
* ``int4_weight:xnnpack``: torchao's ``QATConfig`` around ``Int8DynamicActivationIntxWeightConfig`` (4-bit
  symmetric weights, 8-bit per-token asymmetric activations computed on the fly, no state beyond the weights)
  applied with ``quantize_``: ``step="prepare"`` swaps in ``FakeQuantizedLinear``, ``step="convert"`` gives the
  same module :func:`~pqv_lightning.quantization.quantize` builds for ``int4_weight``. Weights are grouped by
  ``group_size`` input channels when every layer's width allows it, else per output channel everywhere: XNNPACK
  lowers groups only of 32 and torchao's per-channel form not at all, so the ``.pte`` of a model with one odd
  width is 4-bit per channel throughout (PT2E), and training for that keeps the file and the trained model alike.

Fake-quantized PT2E models train without dropout and stochastic depth: the model is exported in eval mode, its
dropout nodes removed (:func:`~pqv_lightning.quantization.export_for_pt2e` says why).

Parameter names are kept (the exported graph holds ``blocks.0.attn.qkv.weight`` where the model did), so a
trainer's optimizer can be pointed at the new tensors by name and a checkpoint of the fake-quantized model loads
into :func:`prepare_qat` of the same model. PT2E models are graphs: a model written for ExecuTorch (e.g.
:func:`pqv_lightning.export.prepare_for_xnnpack`) is what to pass, so that the converted graph lowers as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pqv_lightning.quantization.layers import quantizable_layers, resolve_float_layers
from pqv_lightning.quantization.ptq import (
    QuantizedModel,
    export_for_pt2e,
    has_batch_norm,
    int4_granularities,
    pt2e_quantizer,
)
from pqv_lightning.quantization.targets import QuantizationTarget
from pqv_lightning.utils.checks import check_int, invalid

__all__ = [
    "QAT_TARGETS",
    "check_qat_target",
    "convert_qat",
    "float_weights",
    "prepare_qat",
    "quantization_state",
    "set_observers",
]

QAT_TARGETS: tuple[str, ...] = ("int8_pt2e:xnnpack", "int4_weight:xnnpack")


def check_qat_target(target: str | QuantizationTarget, name: str = "target") -> QuantizationTarget:
    """``target`` parsed, if quantization-aware training can fake-quantize it (else raise naming what can)."""
    parsed = QuantizationTarget.parse(target) if isinstance(target, str) else target
    if not isinstance(parsed, QuantizationTarget) or str(parsed) not in QAT_TARGETS:
        raise invalid(
            name,
            str(target),
            f"a target quantization-aware training fake-quantizes: {', '.join(QAT_TARGETS)} ({parsed} has no "
            "fake-quantized training form here: use it as a post-training Quantization target)"
            if isinstance(parsed, QuantizationTarget)
            else ", ".join(QAT_TARGETS),
        )
    return parsed


def _int4_configs(model: nn.Module, group_size: int, keep: Sequence[str]) -> dict[str, Any]:
    """One granularity for every INT4 layer (see the module docstring), by layer name."""
    from torchao.quantization.granularity import PerAxis

    granularity_of = int4_granularities(model, group_size, keep)
    if any(isinstance(g, PerAxis) for g in granularity_of.values()):
        granularity_of = dict.fromkeys(granularity_of, PerAxis(0))
    return granularity_of


def _int4_apply(model: nn.Module, granularity_of: dict[str, Any], step: str) -> None:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.qat import QATConfig

    for granularity in {repr(g): g for g in granularity_of.values()}.values():
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)
        quantize_(
            model,
            QATConfig(base, step=step),
            filter_fn=lambda m, fqn, g=granularity: isinstance(m, nn.Linear) and granularity_of.get(fqn) == g,
        )


def prepare_qat(
    model: nn.Module,
    target: str | QuantizationTarget,
    example_input: Tensor,
    float_layers: Sequence[str] = (),
    group_size: int = 32,
) -> nn.Module:
    """A fake-quantized copy of ``model`` for ``target``, in training mode, on the model's device (``model`` is not
    modified).

    ``float_layers`` (names or globs of layers or blocks) are trained and kept in float. ``example_input`` fixes
    everything but the batch size (PT2E exports the model with a dynamic batch dimension).
    """
    target = check_qat_target(target)
    if not isinstance(model, nn.Module):
        raise invalid("model", type(model).__name__, "a torch.nn.Module")
    check_int("group_size", group_size, 1)
    keep = resolve_float_layers(model, float_layers, target.method) if float_layers else ()
    if len(keep) == len(quantizable_layers(model, target.method)):
        raise invalid("float_layers", list(float_layers), f"patterns that leave at least one layer for {target}")
    work = copy.deepcopy(model).float()
    if target.method == "int4_weight":
        _int4_apply(work, _int4_configs(work, group_size, keep), "prepare")
        return work.train()

    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    if has_batch_norm(work):
        raise invalid(
            "model",
            type(model).__name__,
            f"a model without batch norm for {target} QAT (the exported "
            "graph's train/eval switch rewrites batch-norm and dropout literals)",
        )
    exported = export_for_pt2e(work.eval(), example_input)
    quantizer = pt2e_quantizer(target.backend, 8, False, keep, qat=True, batch_norm=False)
    prepared = prepare_qat_pt2e(exported, quantizer)
    _portable(prepared)
    allow_exported_model_train_eval(prepared)
    prepared.train()  # the exported model's train() returns None
    return prepared


def _fp32_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].float(), *args[1:])


def _portable(prepared: nn.Module) -> None:
    """Let the fake-quantized graph train on any device and under autocast, then convert on the CPU.

    ``torch.export`` records each ``.to()``/``.float()`` that was a no-op for the example input as an
    ``aten._assert_tensor_metadata`` node pinning the export run's device and dtype: a graph exported on a GPU would
    then refuse CPU tensors at conversion, and under ``bf16-mixed`` autocast the bf16 output of an attention product
    fails its float32 check. The nodes compute nothing, so they go. The fused observer-and-fake-quantize kernel
    takes float32 only, so the fake quantizers get their input in float32 (autocast hands them bf16 activations).
    """
    graph = getattr(prepared, "graph", None)
    if graph is not None:
        asserts = [n for n in graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
        for node in asserts:
            graph.erase_node(node)
        if asserts:
            prepared.recompile()
    for _, quantizer in _fake_quantizers(prepared):
        quantizer.register_forward_pre_hook(_fp32_input)


def _fake_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)]


def set_observers(model: nn.Module, enabled: bool) -> int:
    """Let the observers of a PT2E fake-quantized model update their ranges (``enabled``) or keep them fixed
    (evaluation); returns how many there are (0 for INT4 QAT, whose quantization parameters are computed from
    the weights and activations at every call)."""
    quantizers = _fake_quantizers(model)
    for _, quantizer in quantizers:
        quantizer.enable_observer(enabled)
    return len(quantizers)


def quantization_state(model: nn.Module) -> dict[str, Tensor]:
    """The buffers of every fake quantizer and observer (scales, zero points, ranges, on/off flags) by name."""
    state: dict[str, Tensor] = {}
    for prefix, quantizer in _fake_quantizers(model):
        for name, buffer in quantizer.named_buffers():
            state[f"{prefix}.{name}"] = buffer
    return state


def convert_qat(
    prepared: nn.Module,
    target: str | QuantizationTarget,
    float_layers: Sequence[str] = (),
    info: dict[str, Any] | None = None,
    source: nn.Module | None = None,
) -> QuantizedModel:
    """The quantized model a fake-quantized one (from :func:`prepare_qat`) trained for, in eval mode; ``prepared``
    is not modified. ``float_layers`` are recorded (they were fixed at :func:`prepare_qat`); ``source`` is the
    trained float model (:func:`float_weights`), kept for formats that quantize it themselves."""
    target = check_qat_target(target)
    work = copy.deepcopy(prepared).cpu()
    details = {"float_layers": list(float_layers), **(info or {})}
    if target.method == "int4_weight":
        from torchao.quantization.qat import FakeQuantizedLinear

        granularity = {
            name: m.weight_fake_quantizer.config.granularity
            for name, m in work.named_modules()
            if isinstance(m, FakeQuantizedLinear)
        }
        if not granularity:
            raise invalid("prepared", type(prepared).__name__, "a model from prepare_qat (it has no fake quantizer)")
        _int4_apply(work, granularity, "convert")
        return QuantizedModel(target, work.eval(), details, origin="qat", source=source)
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if not _fake_quantizers(work):
        raise invalid("prepared", type(prepared).__name__, "a model from prepare_qat (it has no fake quantizer)")
    work.eval()
    converted = convert_pt2e(work)
    allow_exported_model_train_eval(converted)
    converted.eval()
    return QuantizedModel(target, converted, details, origin="qat", source=source)


def float_weights(prepared: nn.Module, template: nn.Module) -> nn.Module:
    """A copy of ``template`` (the model :func:`prepare_qat` was given) holding the weights trained through fake
    quantization, in eval mode: the float model a QAT run ends with."""
    model = copy.deepcopy(template).cpu().float().eval()
    trained = {name: p for name, p in prepared.named_parameters()}
    trained.update({name: b for name, b in prepared.named_buffers() if name in model.state_dict()})
    state = model.state_dict()
    missing = [key for key in state if key not in trained]
    if missing:
        raise ValueError(f"The QAT model lacks {len(missing)} tensor(s) of the float model, e.g. {missing[:3]}.")
    with torch.no_grad():
        for key, value in state.items():
            # XNNPACK's patch embedding stores its conv weight 2-D: same values, the template's shape
            value.copy_(trained[key].detach().reshape(value.shape))
    return model
