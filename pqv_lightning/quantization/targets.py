"""What to quantize to: a method and the backend it is prepared for, and what this installation can build."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pqv_lightning.utils.checks import check_choice, check_int, invalid

__all__ = [
    "CALIBRATED_METHODS",
    "LEGACY_ENGINES",
    "METHODS",
    "PT2E_BACKENDS",
    "QuantizationTarget",
    "installed_legacy_engines",
    "parse_targets",
    "supported_targets",
]

METHODS: tuple[str, ...] = ("fp16", "int8_dynamic", "int8_static", "int8_pt2e", "int4_weight")
LEGACY_ENGINES: tuple[str, ...] = ("x86", "fbgemm", "qnnpack", "onednn")
PT2E_BACKENDS: tuple[str, ...] = ("xnnpack", "x86")
#: Methods that calibrate activation ranges on images.
CALIBRATED_METHODS: tuple[str, ...] = ("int8_static", "int8_pt2e")
_BACKENDS: dict[str, tuple[str, ...]] = {
    "fp16": ("none",),
    "int8_dynamic": LEGACY_ENGINES,
    "int8_static": LEGACY_ENGINES,
    "int8_pt2e": PT2E_BACKENDS,
    "int4_weight": ("xnnpack",),
}
_PRECISION = {"fp16": "fp16", "int4_weight": "int4"}


def installed_legacy_engines() -> list[str]:
    """The ``torch.backends.quantized`` engines of this torch build, in :data:`LEGACY_ENGINES` order."""
    return [e for e in LEGACY_ENGINES if e in torch.backends.quantized.supported_engines]


@dataclass(frozen=True)
class QuantizationTarget:
    """What to quantize to: a method and the backend it is prepared for.

    ``backend`` may be left empty for the method's default (x86 for the torch.ao engines, xnnpack for
    PT2E and INT4, none for FP16). Invalid combinations raise at construction.
    """

    method: str
    backend: str = ""

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        backend = self.backend or _default_backend(self.method)
        allowed = _BACKENDS[self.method]
        if backend not in allowed:
            raise invalid("backend", backend, f"{', '.join(allowed)} (for method {self.method!r})")
        if self.method in ("int8_dynamic", "int8_static") and backend not in installed_legacy_engines():
            raise invalid(
                "backend",
                backend,
                f"a quantized engine this torch build has (torch {torch.__version__}): "
                f"{', '.join(installed_legacy_engines()) or 'none'}",
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
        raise invalid(
            "target", spec, f"'method[:backend]' with method one of {', '.join(METHODS)} (see supported_targets())"
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

    @property
    def calibrated(self) -> bool:
        """Whether this target calibrates activation ranges on images."""
        return self.method in CALIBRATED_METHODS

    def __str__(self) -> str:
        return self.method if self.backend == "none" else f"{self.method}:{self.backend}"


def _default_backend(method: str) -> str:
    if method in ("int8_dynamic", "int8_static"):
        installed = installed_legacy_engines()
        return "x86" if "x86" in installed or not installed else installed[0]
    return _BACKENDS[method][0]


def supported_targets() -> list[str]:
    """Target specs (``parse``-able) that this installation can build."""
    targets = ["fp16"]
    for method in ("int8_dynamic", "int8_static"):
        targets += [f"{method}:{engine}" for engine in installed_legacy_engines()]
    has_torchao = importlib.util.find_spec("torchao") is not None
    if has_torchao and importlib.util.find_spec("executorch") is not None:
        targets.append("int8_pt2e:xnnpack")
    if has_torchao:
        targets += ["int8_pt2e:x86", "int4_weight:xnnpack"]
    return targets


def parse_targets(targets: Sequence[str | QuantizationTarget], calibration_batches: int) -> list[QuantizationTarget]:
    """Parse and check target specs against this installation; raise naming the bad value and accepted ones."""
    if isinstance(targets, (str, QuantizationTarget)):
        targets = [targets]
    available = supported_targets()
    if not targets:
        raise invalid("targets", list(targets), f"one or more of {', '.join(available)}")
    parsed: list[QuantizationTarget] = []
    for i, spec in enumerate(targets):
        target = spec if isinstance(spec, QuantizationTarget) else QuantizationTarget.parse(str(spec))
        if str(target) not in available:
            raise invalid(f"targets[{i}]", str(spec), f"a target this installation builds: {', '.join(available)}")
        if target in parsed:
            raise invalid(f"targets[{i}]", str(spec), "each target once (it is listed twice)")
        parsed.append(target)
    check_int("calibration_batches", calibration_batches, 0)
    calibrated = [str(t) for t in parsed if t.calibrated]
    if calibrated and calibration_batches == 0:
        raise invalid(
            "calibration_batches",
            calibration_batches,
            f"an int >= 1, because {', '.join(calibrated)} calibrate activations on data (or use "
            "int8_dynamic / fp16 / int4_weight)",
        )
    return parsed
