"""Post-training quantization engine: FP16, INT8 per CPU backend, and INT4 weights.

Two INT8 families live side by side:

* ``int8_dynamic`` / ``int8_static`` use the legacy ``torch.ao.quantization`` eager and FX paths with a
  ``torch.backends.quantized`` engine (x86, fbgemm, qnnpack, onednn). PyTorch deprecates these in favour of
  torchao PT2E, but they are what the PQV-Mobile paper measures and the only path to TorchScript / lite
  interpreter artifacts, so they are kept, and their deprecation warnings are silenced here in one place.
* ``int8_pt2e`` uses ``torch.export`` + torchao ``prepare_pt2e``/``convert_pt2e`` with ExecuTorch's
  ``XNNPACKQuantizer`` (the graph the ExecuTorch exporter lowers to XNNPACK) or torchao's
  ``X86InductorQuantizer``.

``int4_weight`` is torchao's ``Int8DynamicActivationIntxWeightConfig`` with ``torch.int4`` weights in the
unpacked-to-int8 layout: it runs eagerly on any CPU and is the form ExecuTorch lowers to XNNPACK.

Every method takes ``float_layers`` (mixed precision, :mod:`~pqv_lightning.quantization.layers`): those layers
stay in float and the rest is quantized as usual; the variant's ``info["float_layers"]`` lists them.

Static PT2E for XNNPACK quantizes the layers (linear, convolution) and nothing else: XNNPACKQuantizer's global
config also puts every ``add``/``mul`` on an int8 grid, and in a ViT that includes the layer-norm arithmetic
(``var + eps``, whose per-tensor scale rounds the variance of quiet tokens to 0, so ``rsqrt`` returns inf or a
huge factor) and the residual stream (ViT residual activations have a few channels far larger than the rest).
On a 25%-pruned deit_small that cost the static INT8 ``.pte`` its verification (top-1 agreement 0.891): its
class token is a quiet token (block-0 variance 3.4e-4 against 0.34 for patch tokens, random weights). Measured
on that network (64 random images, ridge-fitted head): global config 0.953 eager; layers only 1.000 eager and
1.000 for its ``.pte``, fully delegated. ``tests/test_quantization_engine.py`` reproduces it on a 2-block ViT.

Everything runs on CPU; the input model is deep-copied and never mutated.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pqv_lightning.quantization.layers import quantizable_layers, resolve_float_layers
from pqv_lightning.quantization.rounding import ROUNDINGS, round_weights
from pqv_lightning.quantization.targets import PT2E_BACKENDS, QuantizationTarget
from pqv_lightning.utils.batches import images_of
from pqv_lightning.utils.checks import check_bool, check_choice, check_int, invalid
from pqv_lightning.utils.deprecations import silenced
from pqv_lightning.utils.modules import cpu_float_copy

__all__ = [
    "EngineScoped",
    "HalfPrecision",
    "QuantizedModel",
    "export_for_pt2e",
    "has_batch_norm",
    "int4_granularities",
    "pt2e_quantizer",
    "quantize",
    "quantize_pt2e",
    "quantized_engine",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quantized_engine(engine: str | None) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` (process-global state) for the block, then restore it.

    ``None`` leaves the engine as it is (float models need none)."""
    if engine is None:
        yield
        return
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@dataclass
class QuantizedModel:
    """A quantized copy of a model. ``module`` maps float32 images ``[B, C, H, W]`` to float32 logits.

    ``origin`` is ``"ptq"`` (post-training quantization of the float model) or ``"qat"`` (converted from
    quantization-aware training, see :mod:`~pqv_lightning.quantization.qat`); ``info["float_layers"]`` lists the
    layers kept in float. ``source`` is the float model a QAT variant was trained as, for a format that quantizes
    it again in its own way (per-channel INT4 in ExecuTorch).
    """

    target: QuantizationTarget
    module: nn.Module
    info: dict[str, object] = field(default_factory=dict)
    origin: str = "ptq"
    source: nn.Module | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The variant's identifier: the target's name, ``qat_``-prefixed for a QAT model."""
        return f"qat_{self.target.name}" if self.origin == "qat" else self.target.name

    @property
    def float_layers(self) -> list[str]:
        return list(self.info.get("float_layers", []))  # type: ignore[call-overload]

    def unwrapped(self) -> nn.Module:
        """The quantized network without the engine / dtype wrapper (e.g. for TorchScript export).

        For INT8 torch.ao targets, run or script it inside ``quantized_engine(self.target.engine)``.
        """
        return self.module.module if isinstance(self.module, EngineScoped | HalfPrecision) else self.module


class EngineScoped(nn.Module):
    """Runs a ``torch.ao`` quantized module under the engine its weights were packed for."""

    def __init__(self, module: nn.Module, engine: str) -> None:
        super().__init__()
        self.module = module
        self.engine = engine
        self.train(module.training)  # a new Module says training=True: evaluate() would restore that onto module

    def forward(self, x: Tensor) -> Tensor:
        with quantized_engine(self.engine), silenced("torch.ao"):
            return self.module(x)

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}"


class HalfPrecision(nn.Module):
    """Holds a float16 network; casts float32 inputs to float16 and the logits back to float32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()
        self.train(module.training)  # as EngineScoped: the wrapper's mode is the network's

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.to(torch.float16)).float()


def _check_model(model: nn.Module, needs_linear: bool) -> None:
    if not isinstance(model, nn.Module):
        raise invalid("model", type(model).__name__, "a torch.nn.Module")
    if needs_linear and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize (all methods but fp16 need one).")


def _check_example(example_input: Tensor) -> None:
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point() or example_input.dim() < 2:
        shown = list(example_input.shape) if isinstance(example_input, Tensor) else type(example_input).__name__
        raise invalid("example_input", shown, "a floating-point Tensor with a batch dimension, e.g. [B, C, H, W]")


def _check_calibration(calibration: Iterable | None, calibration_batches: int | None, method: str) -> None:
    check_int("calibration_batches", calibration_batches, 1, allow_none=True)
    if calibration is None:
        raise ValueError(f"Method {method!r} calibrates activations: pass calibration batches (got None).")
    if hasattr(calibration, "__len__") and len(calibration) == 0:  # type: ignore[arg-type]
        raise ValueError(f"Method {method!r} calibrates activations: calibration has zero batches.")


def _calibrate(module: nn.Module, calibration: Iterable, limit: int | None) -> int:
    seen = 0
    with torch.no_grad():
        for batch in itertools.islice(calibration, limit):
            module(images_of(batch).detach().cpu().float())
            seen += 1
    if seen == 0:
        raise ValueError("calibration yielded zero batches; static quantization needs at least one.")
    return seen


def _float_copy(model: nn.Module) -> nn.Module:
    return cpu_float_copy(model)


def quantize(
    model: nn.Module,
    target: QuantizationTarget | str,
    example_input: Tensor,
    calibration: Iterable[Tensor] | None = None,
    calibration_batches: int | None = None,
    int4_group_size: int = 32,
    float_layers: Sequence[str] = (),
    rounding: str = "nearest",
    bias_correction: bool = False,
) -> QuantizedModel:
    """Return a quantized CPU copy of ``model`` for ``target``.

    ``calibration`` (tensors or ``(images, labels)`` batches; the first ``calibration_batches`` are used)
    is required by ``int8_static`` and ``int8_pt2e``. INT4 weights are quantized in groups of
    ``int4_group_size`` input channels, per output channel for layers whose width it does not divide.
    ``float_layers`` (names or globs of layers or blocks, see :func:`resolve_float_layers`) stay in float.
    The method is the target's registered :class:`~pqv_lightning.quantization.methods.QuantizationMethod`.
    ``rounding="gptq"`` and ``bias_correction`` round the linear weights on ``calibration`` first, on the grid the
    target's runtime derives (:func:`~pqv_lightning.quantization.round_weights`); ``info["rounding"]`` says how.

    Raises:
        InvalidArgumentError: an unknown target or backend, float layers that match nothing (or every layer, or any
            layer for a method that casts the whole model), a bad example input, rounding for a target without
            integer weights.
        ValueError: a calibrated method (or rounding) without calibration batches, or a model without a layer to
            quantize.

    Example::

        variant = quantize(model, "int8_pt2e:xnnpack", images[:1], calibration=[images], float_layers=["head"])
        logits = variant.module(images)
    """
    target = QuantizationTarget.parse(target) if isinstance(target, str) else target
    if not isinstance(target, QuantizationTarget):
        raise invalid("target", target, "a QuantizationTarget or a 'method[:backend]' string")
    method = target.spec
    _check_model(model, needs_linear=bool(method.layers))
    _check_example(example_input)
    keep = _float_layers_for(model, target, float_layers)
    check_choice("rounding", rounding, ROUNDINGS)
    check_bool("bias_correction", bias_correction)
    rounds = rounding != "nearest" or bias_correction
    if method.calibrated or rounds:
        _check_calibration(calibration, calibration_batches, target.method if not rounds else f"{rounding} rounding")
    check_int("int4_group_size", int4_group_size, 1)
    example_input = example_input.detach().cpu().float()
    rounded = None
    if rounds:
        rounded = round_weights(
            model, target, calibration, rounding, bias_correction, calibration_batches, keep, int4_group_size
        )
        model = rounded.model
    module, info = method.builder()(
        _float_copy(model),
        target,
        example_input,
        calibration,
        calibration_batches,
        keep,
        {"int4_group_size": int4_group_size},
    )
    if rounded is not None:
        info["rounding"] = rounded.summary()
    return QuantizedModel(target, module, {"float_layers": list(keep), **info})


# The build functions of the registered methods (pqv_lightning.quantization.methods): a float CPU copy in eval
# mode, the target, an example input, the checked calibration batches,
# the float layers and the method's options -> (quantized module, what to record).


def build_fp16(model: nn.Module, target, example_input, calibration, calibration_batches, keep, options):
    return HalfPrecision(model), {}


def build_int8_dynamic(model: nn.Module, target, example_input, calibration, calibration_batches, keep, options):
    return EngineScoped(_quantize_dynamic(model, target.backend, keep), target.backend), {}


def build_int8_static(model: nn.Module, target, example_input, calibration, calibration_batches, keep, options):
    quantized, seen = _quantize_static_fx(model, target.backend, example_input, calibration, calibration_batches, keep)
    return EngineScoped(quantized, target.backend), {"calibration_batches": seen}


def build_int8_pt2e(model: nn.Module, target, example_input, calibration, calibration_batches, keep, options):
    graph = quantize_pt2e(model, target.backend, example_input, calibration, 8, calibration_batches, float_layers=keep)
    return graph, {}


def build_int4(model: nn.Module, target, example_input, calibration, calibration_batches, keep, options):
    return _quantize_int4(model, options["int4_group_size"], keep), {}


def _float_layers_for(model: nn.Module, target: QuantizationTarget, float_layers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(float_layers, str):
        float_layers = [float_layers]
    if not float_layers:
        return ()
    if not target.spec.float_layers:
        raise invalid(
            "float_layers", list(float_layers), f"an empty list for {target.method} (it casts the whole model)"
        )
    keep = resolve_float_layers(model, float_layers, target.method)
    if len(keep) == len(quantizable_layers(model, target.method)):
        raise invalid(
            "float_layers", list(float_layers), f"patterns that leave at least one layer for {target} to quantize"
        )
    return keep


def _quantize_dynamic(model: nn.Module, engine: str, keep: Sequence[str] = ()) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec: set | dict = {nn.Linear}
    if keep:  # by name: the layers that are quantized, each with the default qconfig of {nn.Linear}
        spec = {name: default_dynamic_qconfig for name in quantizable_layers(model, "int8_dynamic") if name not in keep}
    with quantized_engine(engine), silenced("torch.ao"):
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def _quantize_static_fx(
    model: nn.Module,
    engine: str,
    example_input: Tensor,
    calibration: Iterable,
    limit: int | None,
    keep: Sequence[str] = (),
) -> tuple[nn.Module, int]:
    """FX graph mode: observe and quantize the inputs, weights and outputs of every nn.Linear not in ``keep``."""
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quantized_engine(engine), silenced("torch.ao"):
        mapping = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig(engine))
        for name in keep:
            mapping.set_module_name(name, None)
        try:
            prepared = prepare_fx(model, mapping, (example_input,))
        except Exception as err:  # symbolic tracing failures have many exception types
            raise RuntimeError(
                f"FX symbolic tracing of {type(model).__name__} failed, so int8_static cannot be applied; "
                "use int8_dynamic or int8_pt2e for this model."
            ) from err
        seen = _calibrate(prepared, calibration, limit)
        return convert_fx(prepared), seen


def int4_granularities(model: nn.Module, group_size: int, keep: Sequence[str] = ()) -> dict[str, object]:
    """The torchao weight granularity of each INT4 layer: groups of ``group_size`` input channels where the width
    allows, per output channel elsewhere; the layers in ``keep`` are left out (they stay in float)."""
    from torchao.quantization.granularity import PerAxis, PerGroup

    return {
        name: PerGroup(group_size) if module.in_features % group_size == 0 else PerAxis(0)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in keep
    }


def _quantize_int4(model: nn.Module, group_size: int, keep: Sequence[str] = ()) -> nn.Module:
    """4-bit symmetric weights + 8-bit dynamic per-token activations on every nn.Linear (torchao)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_

    granularity_of = int4_granularities(model, group_size, keep)
    for granularity in {repr(g): g for g in granularity_of.values()}.values():
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)
        quantize_(
            model,
            config,
            filter_fn=lambda m, fqn, g=granularity: isinstance(m, nn.Linear) and granularity_of.get(fqn) == g,
        )
    return model


def pt2e_quantizer(
    backend: str,
    weight_bits: int = 8,
    dynamic: bool = False,
    float_layers: Sequence[str] = (),
    qat: bool = False,
    batch_norm: bool = True,
) -> object:
    """The PT2E quantizer of ``backend`` that leaves the modules named in ``float_layers`` in float.

    XNNPACK: per-channel symmetric weights (``weight_bits`` 8 or 4) on linear and convolution layers only (see
    the module docstring); ``qat`` gives the fake-quantizing config of ``prepare_qat_pt2e``; ``batch_norm=False``
    (a model without batch norm) skips the conv + batch-norm patterns, whose matching exports a pattern graph per
    pattern and took 3/4 of the time of quantizing a 2-block ViT. x86: torchao's ``X86InductorQuantizer``
    default config.
    """
    if backend == "xnnpack":
        if importlib.util.find_spec("executorch") is None:
            raise RuntimeError("int8_pt2e:xnnpack needs the executorch package (XNNPACKQuantizer).")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # importlib.resources use inside executorch
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
        from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

        qrange = {"weight_qmin": -8, "weight_qmax": 7} if weight_bits == 4 else {}
        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic, is_qat=qat, **qrange)
        quantizer = XNNPACKQuantizer() if batch_norm else _without_batch_norm_patterns(XNNPACKQuantizer)()
        if weight_bits == 4:  # XNNPACK runs 4-bit weights in linear layers only (not in the patch conv)
            quantizer.set_module_type(nn.Linear, config)
        else:
            for op in _PT2E_LAYER_OPS:
                quantizer.set_operator_type(op, config)
        if float_layers:  # set_module_name(name, None) is refused by executorch 1.5: filter the nodes instead
            in_float = [get_module_name_filter(name) for name in float_layers]
            quantizer.set_filter_function(lambda node: not any(f(node) for f in in_float))
        return quantizer
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_dynamic=dynamic, is_qat=qat)
    )
    for name in float_layers:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


@functools.cache
def _without_batch_norm_patterns(quantizer: type) -> type:
    """The quantizer class without its ``*_bn*`` patterns (conv + batch norm fusions)."""
    patterns = [p for p in quantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]
    return type(f"{quantizer.__name__}WithoutBatchNorm", (quantizer,), {"SUPPORTED_PATTERNS": patterns})


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules())


#: The operators static/dynamic 8-bit XNNPACK PT2E quantizes: the layers, not the elementwise arithmetic.
_PT2E_LAYER_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)


def quantize_pt2e(
    model: nn.Module,
    backend: str,
    example_input: Tensor,
    calibration: Iterable[Tensor] | None,
    weight_bits: int = 8,
    calibration_batches: int | None = None,
    dynamic_activations: bool | None = None,
    float_layers: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """``torch.export`` -> torchao ``prepare_pt2e`` -> calibrate -> ``convert_pt2e``; returns a Q/DQ graph.

    ``backend="xnnpack"`` uses ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric weights): the result
    is what the ExecuTorch exporter re-exports and lowers. ``weight_bits=4`` gives 4-bit per-channel weights
    with, by default, dynamic per-token INT8 activations (the 4-bit form XNNPACK runs); 8-bit defaults to
    static activations calibrated on ``calibration``. ``backend="x86"`` uses torchao's
    ``X86InductorQuantizer`` (8-bit only; fast under ``torch.compile``, reference Q/DQ kernels in eager).
    The batch dimension is exported as dynamic, so any batch size runs. ``.eval()`` / ``.train()`` work.
    ``float_layers`` (names or globs) stay in float.
    """
    check_choice("backend", backend, PT2E_BACKENDS)
    allowed_bits = (4, 8) if backend == "xnnpack" else (8,)
    if weight_bits not in allowed_bits:
        raise invalid("weight_bits", weight_bits, f"{', '.join(map(str, allowed_bits))} (for PT2E backend {backend!r})")
    dynamic = (weight_bits == 4) if dynamic_activations is None else dynamic_activations
    _check_model(model, needs_linear=True)
    _check_example(example_input)
    keep = resolve_float_layers(model, float_layers, "int8_pt2e") if float_layers else ()
    if not dynamic:
        _check_calibration(calibration, calibration_batches, "int8_pt2e")
    else:
        check_int("calibration_batches", calibration_batches, 1, allow_none=True)
    quantizer = pt2e_quantizer(backend, weight_bits, dynamic, keep, batch_norm=has_batch_norm(model))

    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = export_for_pt2e(_float_copy(model), example_input)
    prepared = prepare_pt2e(exported, quantizer)
    if calibration is not None:
        _calibrate(prepared, calibration, calibration_batches)
    else:
        with torch.no_grad():
            prepared(_batch_of_two(example_input))
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)
    # An exported graph module starts with training=True, and torchao's eval() rewrites the graph's ops without
    # changing the flag: anything that evaluates it and restores the mode would switch its batch norms to batch
    # statistics (LeViT, EfficientFormer, ...).
    converted.eval()
    converted.training = False
    return converted


def _batch_of_two(example_input: Tensor) -> Tensor:
    example = example_input.detach().cpu().float()
    if example.shape[0] == 1:  # a size-1 dimension would be specialised, and the batch fixed to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example


def export_for_pt2e(model: nn.Module, example_input: Tensor) -> torch.fx.GraphModule:
    """``torch.export`` of an eval-mode ``model`` with a dynamic batch dimension, as the PT2E quantizers take it,
    without its dropout nodes (identities in eval mode).

    The dropout nodes go because torchao's train/eval switch for exported graphs
    (``allow_exported_model_train_eval``, torchao 0.18 ``export_utils._replace_dropout``) replaces patterns with
    ``ignore_literals=True``: every dropout becomes ``dropout(x, p=0.5, train=True)`` whatever its ``p``, so a ViT
    exported with ``drop_rate=0`` trained (QAT) with half its activations dropped after the first ``.train()``.
    """
    batch = torch.export.Dim.AUTO
    example = _batch_of_two(example_input).to(next(model.parameters()).device)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.dropout.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()
    return graph
