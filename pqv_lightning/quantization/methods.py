"""The quantization methods, one :class:`QuantizationMethod` each, in one registry.

A method owns its name, the precision it produces, its backends and default backend, whether it calibrates on
images, which layer types it quantizes (and so which float layers it can keep), whether its eager module scripts to
TorchScript, what it needs installed, and the function that builds it. :class:`~.targets.QuantizationTarget`,
:func:`~.ptq.quantize`, the float-layer resolution and the export formats read their answers here. A new method is
one module with its build function and one :func:`register_method` call in this file.

The build function, ``build(model, target, example_input, calibration, calibration_batches, float_layers, options)
-> (module, info)``, receives a float CPU copy of the model in eval mode, the target, a CPU example input, the
checked calibration batches (or ``None``), the resolved float layers and the method's options, and returns the
quantized module (in eval mode) and what to record about it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from pqv_lightning.utils.checks import invalid

__all__ = [
    "LEGACY_ENGINES",
    "QuantizationMethod",
    "get_method",
    "list_methods",
    "method_names",
    "register_method",
]

#: The ``torch.backends.quantized`` engines of the torch.ao methods (those of this torch build are usable).
LEGACY_ENGINES: tuple[str, ...] = ("x86", "fbgemm", "qnnpack", "onednn")


@dataclass(frozen=True)
class QuantizationMethod:
    """What one quantization method is and how it is built.

    Args:
        name: the method's name (``"method[:backend]"`` targets).
        precision: what its files and variants are labelled (``"int8"``, ``"fp16"``, ``"int4"``).
        backends: the backends it is prepared for; the first is the default (for ``engine`` methods: the first
            engine this torch build has).
        build: ``"module:function"`` that builds it (see the module docstring), imported on first use.
        description: one line for help texts.
        calibrated: calibrates activation ranges on images.
        layers: the layer types it quantizes (``"linear"``, ``"conv2d"``); empty: the whole model is cast, so no
            layer can stay in float.
        engine: the backend is a ``torch.backends.quantized`` engine (torch.ao): the module runs under it.
        torchscript: its eager module scripts to TorchScript / lite.
        requires: ``{backend: importable packages}`` beyond the required dependencies (``"*"``: every backend).
    """

    name: str
    precision: str
    backends: tuple[str, ...]
    build: str
    description: str
    calibrated: bool = False
    layers: tuple[str, ...] = ("linear",)
    engine: bool = False
    torchscript: bool = False
    requires: dict[str, tuple[str, ...]] | None = None

    @property
    def float_layers(self) -> bool:
        """Whether some layers can stay in float (mixed precision)."""
        return bool(self.layers)

    def builder(self) -> Callable:
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)

    def installed_backends(self) -> tuple[str, ...]:
        """The backends this installation can build (engines of this torch build, packages installed)."""
        backends = self.backends
        if self.engine:
            import torch

            backends = tuple(b for b in backends if b in torch.backends.quantized.supported_engines)
        needs = self.requires or {}
        return tuple(
            b for b in backends
            if all(importlib.util.find_spec(p) is not None for p in (*needs.get("*", ()), *needs.get(b, ())))
        )  # fmt: skip

    def default_backend(self) -> str:
        if self.engine:
            installed = self.installed_backends()
            return "x86" if "x86" in installed or not installed else installed[0]
        return self.backends[0]


_REGISTRY: dict[str, QuantizationMethod] = {}


def register_method(method: QuantizationMethod) -> QuantizationMethod:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if not isinstance(method, QuantizationMethod):
        raise invalid("method", method, "a QuantizationMethod")
    if method.name in _REGISTRY:
        raise invalid("method.name", method.name, f"a name not registered yet (registered: {', '.join(_REGISTRY)})")
    unknown = [kind for kind in method.layers if kind not in LAYER_TYPES]
    if unknown or ":" in method.name:
        raise invalid(f"{method.name}.layers", unknown or method.name, f"{', '.join(LAYER_TYPES)}; a name without ':'")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str, argument: str = "method") -> QuantizationMethod:
    """The registered method called ``name``; an argument error listing the methods otherwise."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    raise invalid(argument, name, ", ".join(_REGISTRY))


def list_methods() -> tuple[QuantizationMethod, ...]:
    return tuple(_REGISTRY.values())


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


#: The layer types a method can quantize, by the names :class:`QuantizationMethod` uses.
LAYER_TYPES = ("linear", "conv2d")

# --------------------------------------------------------------------------- the registered methods

register_method(QuantizationMethod(
    name="fp16", precision="fp16", backends=("none",), build="pqv_lightning.quantization.ptq:build_fp16",
    description="the whole model in float16 (weights and activations)", layers=(), torchscript=True,
))  # fmt: skip
register_method(QuantizationMethod(
    name="int8_dynamic", precision="int8", backends=LEGACY_ENGINES,
    build="pqv_lightning.quantization.ptq:build_int8_dynamic",
    description="torch.ao dynamic INT8 linear layers (PQV-Mobile's method)", engine=True, torchscript=True,
))  # fmt: skip
register_method(QuantizationMethod(
    name="int8_static", precision="int8", backends=LEGACY_ENGINES,
    build="pqv_lightning.quantization.ptq:build_int8_static",
    description="torch.ao FX static INT8 linear layers, activations calibrated", calibrated=True, engine=True,
    torchscript=True,
))  # fmt: skip
register_method(QuantizationMethod(
    name="int8_pt2e", precision="int8", backends=("xnnpack", "x86"),
    build="pqv_lightning.quantization.ptq:build_int8_pt2e",
    description="torchao PT2E static INT8 linear and conv layers for XNNPACK (ExecuTorch) or x86 (Inductor)",
    calibrated=True, layers=("linear", "conv2d"), requires={"*": ("torchao",), "xnnpack": ("executorch",)},
))  # fmt: skip
register_method(QuantizationMethod(
    name="int4_weight", precision="int4", backends=("xnnpack",), build="pqv_lightning.quantization.ptq:build_int4",
    description="torchao INT4 weights (groups of 32) with INT8 dynamic activations on linear layers",
    requires={"*": ("torchao",)},
))  # fmt: skip
