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

Everything runs on CPU; the input model is deep-copied and never mutated.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pqv_lightning._warnings import deprecations_silenced

__all__ = [
    "LEGACY_ENGINES",
    "METHODS",
    "PT2E_BACKENDS",
    "EngineScoped",
    "HalfPrecision",
    "QuantizationTarget",
    "QuantizedModel",
    "evaluate",
    "quantize",
    "quantize_pt2e",
    "quantized_engine",
    "supported_targets",
    "top1_agreement",
]

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("fp16", "int8_dynamic", "int8_static", "int8_pt2e", "int4_weight")
LEGACY_ENGINES: tuple[str, ...] = ("x86", "fbgemm", "qnnpack", "onednn")
PT2E_BACKENDS: tuple[str, ...] = ("xnnpack", "x86")
_BACKENDS: dict[str, tuple[str, ...]] = {
    "fp16": ("none",),
    "int8_dynamic": LEGACY_ENGINES,
    "int8_static": LEGACY_ENGINES,
    "int8_pt2e": PT2E_BACKENDS,
    "int4_weight": ("xnnpack",),
}
_PRECISION = {"fp16": "fp16", "int4_weight": "int4"}
_CALIBRATED = ("int8_static", "int8_pt2e")

# torch.ao eager/FX quantization is deprecated (pytorch/ao#2259) but kept on purpose (see module docstring).
_LEGACY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
)


def _legacy_ao_warnings_silenced() -> contextlib.AbstractContextManager[None]:
    """Silence the known deprecation warnings of ``torch.ao.quantization``; log one notice per process."""
    return deprecations_silenced(
        "int8_dynamic/int8_static use the deprecated torch.ao.quantization path (kept for the PQV-Mobile "
        "backends and TorchScript/lite export); its deprecation warnings are silenced.",
        _LEGACY_WARNINGS,
    )


def _installed_legacy_engines() -> list[str]:
    return [e for e in LEGACY_ENGINES if e in torch.backends.quantized.supported_engines]


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


@dataclass(frozen=True)
class QuantizationTarget:
    """What to quantize to: a method and the backend it is prepared for.

    ``backend`` may be left empty for the method's default (x86 for the torch.ao engines, xnnpack for
    PT2E and INT4, none for FP16). Invalid combinations raise ``ValueError`` at construction.
    """

    method: str
    backend: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown quantization method {self.method!r}; accepted: {', '.join(METHODS)}.")
        backend = self.backend or _default_backend(self.method)
        allowed = _BACKENDS[self.method]
        if backend not in allowed:
            raise ValueError(
                f"Backend {backend!r} is not valid for method {self.method!r}; accepted: {', '.join(allowed)}."
            )
        if self.method in ("int8_dynamic", "int8_static") and backend not in _installed_legacy_engines():
            raise ValueError(
                f"Quantized engine {backend!r} is not supported by this torch build "
                f"(torch {torch.__version__}); supported: {', '.join(_installed_legacy_engines()) or 'none'}."
            )
        object.__setattr__(self, "backend", backend)

    @classmethod
    def parse(cls, spec: str) -> QuantizationTarget:
        """Parse ``"method[:backend]"`` (e.g. ``"int8_dynamic:x86"``, ``"fp16"``) or a ``name``."""
        text = spec.strip().lower()
        if ":" in text:
            method, _, backend = text.partition(":")
            return cls(method.strip(), backend.strip())
        for method in sorted(METHODS, key=len, reverse=True):
            if text == method:
                return cls(method)
            if text.startswith(method + "_"):
                return cls(method, text[len(method) + 1 :])
        raise ValueError(
            f"Unknown quantization target {spec!r}; expected 'method[:backend]' with method one of "
            f"{', '.join(METHODS)} (see supported_targets())."
        )

    @property
    def name(self) -> str:
        """File-name friendly identifier, e.g. ``int8_dynamic_x86``; ``parse`` accepts it back."""
        return self.method if self.backend == "none" else f"{self.method}_{self.backend}"

    @property
    def precision(self) -> str:
        return _PRECISION.get(self.method, "int8")

    @property
    def engine(self) -> str | None:
        """The ``torch.backends.quantized`` engine the quantized module must run under, if any."""
        return self.backend if self.method in ("int8_dynamic", "int8_static") else None

    def __str__(self) -> str:
        return self.method if self.backend == "none" else f"{self.method}:{self.backend}"


def _default_backend(method: str) -> str:
    if method in ("int8_dynamic", "int8_static"):
        installed = _installed_legacy_engines()
        return "x86" if "x86" in installed or not installed else installed[0]
    return _BACKENDS[method][0]


@dataclass
class QuantizedModel:
    """A quantized copy of a model. ``module`` maps float32 images ``[B, C, H, W]`` to float32 logits."""

    target: QuantizationTarget
    module: nn.Module
    info: dict[str, object] = field(default_factory=dict)

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

    def forward(self, x: Tensor) -> Tensor:
        with quantized_engine(self.engine), _legacy_ao_warnings_silenced():
            return self.module(x)

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}"


class HalfPrecision(nn.Module):
    """Holds a float16 network; casts float32 inputs to float16 and the logits back to float32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.to(torch.float16)).float()


def supported_targets() -> list[str]:
    """Target specs (``parse``-able) that this installation can build."""
    targets = ["fp16"]
    for method in ("int8_dynamic", "int8_static"):
        targets += [f"{method}:{engine}" for engine in _installed_legacy_engines()]
    has_torchao = importlib.util.find_spec("torchao") is not None
    if has_torchao and importlib.util.find_spec("executorch") is not None:
        targets.append("int8_pt2e:xnnpack")
    if has_torchao:
        targets += ["int8_pt2e:x86", "int4_weight:xnnpack"]
    return targets


def _images(batch: object) -> Tensor:
    """Accept a tensor of images or an ``(images, labels, ...)`` batch from a data loader."""
    if isinstance(batch, list | tuple):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"Expected a Tensor of images or an (images, labels) batch, got {type(batch).__name__}.")
    return batch


def _check_model(model: nn.Module, needs_linear: bool) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if needs_linear and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize (all methods but fp16 need one).")


def _check_example(example_input: Tensor) -> None:
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point() or example_input.dim() < 2:
        raise ValueError("example_input must be a floating-point Tensor with a batch dimension, e.g. [B, C, H, W].")


def _check_calibration(calibration: Iterable | None, calibration_batches: int | None, method: str) -> None:
    if calibration_batches is not None and calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1 (or None for all), got {calibration_batches}.")
    if calibration is None:
        raise ValueError(f"Method {method!r} calibrates activations: pass calibration batches (got None).")
    if hasattr(calibration, "__len__") and len(calibration) == 0:  # type: ignore[arg-type]
        raise ValueError(f"Method {method!r} calibrates activations: calibration has zero batches.")


def _calibrate(module: nn.Module, calibration: Iterable, limit: int | None) -> int:
    seen = 0
    with torch.no_grad():
        for batch in itertools.islice(calibration, limit):
            module(_images(batch).detach().cpu().float())
            seen += 1
    if seen == 0:
        raise ValueError("calibration yielded zero batches; static quantization needs at least one.")
    return seen


def _float_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().float().eval()


def quantize(
    model: nn.Module,
    target: QuantizationTarget | str,
    example_input: Tensor,
    calibration: Iterable[Tensor] | None = None,
    calibration_batches: int | None = None,
    int4_group_size: int = 32,
) -> QuantizedModel:
    """Return a quantized CPU copy of ``model`` for ``target``.

    ``calibration`` (tensors or ``(images, labels)`` batches; the first ``calibration_batches`` are used)
    is required by ``int8_static`` and ``int8_pt2e``. INT4 weights are quantized in groups of
    ``int4_group_size`` input channels, per output channel for layers whose width it does not divide.
    """
    target = QuantizationTarget.parse(target) if isinstance(target, str) else target
    if not isinstance(target, QuantizationTarget):
        raise TypeError(f"target must be a QuantizationTarget or a spec string, got {type(target).__name__}.")
    _check_model(model, needs_linear=target.method != "fp16")
    _check_example(example_input)
    if target.method in _CALIBRATED:
        _check_calibration(calibration, calibration_batches, target.method)
    if int4_group_size < 1:
        raise ValueError(f"int4_group_size must be >= 1, got {int4_group_size}.")
    example_input = example_input.detach().cpu().float()

    if target.method == "int8_pt2e":
        graph = quantize_pt2e(model, target.backend, example_input, calibration, 8, calibration_batches)
        return QuantizedModel(target, graph)

    float_model = _float_copy(model)
    info: dict[str, object] = {}
    if target.method == "fp16":
        module: nn.Module = HalfPrecision(float_model)
    elif target.method == "int8_dynamic":
        module = EngineScoped(_quantize_dynamic(float_model, target.backend), target.backend)
    elif target.method == "int8_static":
        quantized, info["calibration_batches"] = _quantize_static_fx(
            float_model, target.backend, example_input, calibration, calibration_batches
        )
        module = EngineScoped(quantized, target.backend)
    else:
        module = _quantize_int4(float_model, int4_group_size)
    return QuantizedModel(target, module, info)


def _quantize_dynamic(model: nn.Module, engine: str) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with quantized_engine(engine), _legacy_ao_warnings_silenced():
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def _quantize_static_fx(
    model: nn.Module, engine: str, example_input: Tensor, calibration: Iterable, limit: int | None
) -> tuple[nn.Module, int]:
    """FX graph mode: observe and quantize the inputs, weights and outputs of every nn.Linear."""
    from torch.ao.quantization import QConfigMapping, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quantized_engine(engine), _legacy_ao_warnings_silenced():
        mapping = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig(engine))
        try:
            prepared = prepare_fx(model, mapping, (example_input,))
        except Exception as err:  # symbolic tracing failures have many exception types
            raise RuntimeError(
                f"FX symbolic tracing of {type(model).__name__} failed, so int8_static cannot be applied; "
                "use int8_dynamic or int8_pt2e for this model."
            ) from err
        seen = _calibrate(prepared, calibration, limit)
        return convert_fx(prepared), seen


def _quantize_int4(model: nn.Module, group_size: int) -> nn.Module:
    """4-bit symmetric weights + 8-bit dynamic per-token activations on every nn.Linear (torchao)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    grouped = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % group_size == 0}
    for granularity, selected in ((PerGroup(group_size), True), (PerAxis(0), False)):
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=granularity)
        quantize_(
            model,
            config,
            filter_fn=lambda m, fqn, sel=selected: isinstance(m, nn.Linear) and (fqn in grouped) == sel,
        )
    return model


def _pt2e_quantizer(backend: str, weight_bits: int, dynamic: bool) -> object:
    if backend == "xnnpack":
        if importlib.util.find_spec("executorch") is None:
            raise RuntimeError("int8_pt2e:xnnpack needs the executorch package (XNNPACKQuantizer).")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # importlib.resources use inside executorch
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
        qrange = {"weight_qmin": -8, "weight_qmax": 7} if weight_bits == 4 else {}
        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic, **qrange)
        if weight_bits == 4:  # XNNPACK runs 4-bit weights in linear layers only (not in the patch conv)
            return XNNPACKQuantizer().set_module_type(nn.Linear, config)
        return XNNPACKQuantizer().set_global(config)
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=dynamic))


def quantize_pt2e(
    model: nn.Module,
    backend: str,
    example_input: Tensor,
    calibration: Iterable[Tensor] | None,
    weight_bits: int = 8,
    calibration_batches: int | None = None,
    dynamic_activations: bool | None = None,
) -> torch.fx.GraphModule:
    """``torch.export`` -> torchao ``prepare_pt2e`` -> calibrate -> ``convert_pt2e``; returns a Q/DQ graph.

    ``backend="xnnpack"`` uses ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric weights): the result
    is what the ExecuTorch exporter re-exports and lowers. ``weight_bits=4`` gives 4-bit per-channel weights
    with, by default, dynamic per-token INT8 activations (the 4-bit form XNNPACK runs); 8-bit defaults to
    static activations calibrated on ``calibration``. ``backend="x86"`` uses torchao's
    ``X86InductorQuantizer`` (8-bit only; fast under ``torch.compile``, reference Q/DQ kernels in eager).
    The batch dimension is exported as dynamic, so any batch size runs. ``.eval()`` / ``.train()`` work.
    """
    if backend not in PT2E_BACKENDS:
        raise ValueError(f"Unknown PT2E backend {backend!r}; accepted: {', '.join(PT2E_BACKENDS)}.")
    allowed_bits = (4, 8) if backend == "xnnpack" else (8,)
    if weight_bits not in allowed_bits:
        raise ValueError(
            f"weight_bits={weight_bits} is not supported for PT2E backend {backend!r}; "
            f"accepted: {', '.join(map(str, allowed_bits))}."
        )
    dynamic = (weight_bits == 4) if dynamic_activations is None else dynamic_activations
    _check_model(model, needs_linear=True)
    _check_example(example_input)
    if not dynamic:
        _check_calibration(calibration, calibration_batches, "int8_pt2e")
    elif calibration_batches is not None and calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1 (or None for all), got {calibration_batches}.")
    quantizer = _pt2e_quantizer(backend, weight_bits, dynamic)

    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    float_model = _float_copy(model)
    example = example_input.detach().cpu().float()
    if example.shape[0] == 1:  # a size-1 dimension would be specialised, and the batch fixed to 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim.AUTO
    exported = torch.export.export(float_model, (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    if calibration is not None:
        _calibrate(prepared, calibration, calibration_batches)
    else:
        with torch.no_grad():
            prepared(example)
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)
    return converted


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    if was_training:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train()


def evaluate(module: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``module`` on ``(images, labels)`` batches, on CPU."""
    correct1 = correct5 = total = 0
    with _evaluating(module):
        for images, labels in batches:
            logits = module(images.cpu().float())
            k = min(5, logits.shape[-1])
            topk = logits.topk(k, dim=-1).indices
            labels = labels.cpu().view(-1, 1)
            correct1 += int((topk[:, :1] == labels).sum())
            correct5 += int((topk == labels).any(dim=-1).sum())
            total += labels.shape[0]
    if total == 0:
        raise ValueError("evaluate() received no batches.")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def top1_agreement(reference: nn.Module, candidate: nn.Module, images: Iterable[Tensor]) -> float:
    """Fraction of images on which both modules predict the same class (``(images, labels)`` batches ok)."""
    same = total = 0
    with _evaluating(reference), _evaluating(candidate):
        for batch in images:
            x = _images(batch).cpu().float()
            same += int((reference(x).argmax(-1) == candidate(x).argmax(-1)).sum())
            total += x.shape[0]
    if total == 0:
        raise ValueError("top1_agreement() received no images.")
    return same / total
