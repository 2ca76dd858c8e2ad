"""What to quantize to: a method and the backend it is prepared for, and what this installation can build."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pqv_lightning.quantization.methods import LEGACY_ENGINES, get_method, list_methods, method_names
from pqv_lightning.utils.checks import check_int, invalid

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

#: The registered methods (:mod:`~pqv_lightning.quantization.methods`), those that calibrate on images, and the
#: backends of PT2E.
METHODS: tuple[str, ...] = method_names()
CALIBRATED_METHODS: tuple[str, ...] = tuple(m.name for m in list_methods() if m.calibrated)
PT2E_BACKENDS: tuple[str, ...] = get_method("int8_pt2e").backends


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
        method = get_method(self.method, "method")
        backend = self.backend or method.default_backend()
        if backend not in method.backends:
            raise invalid("backend", backend, f"{', '.join(method.backends)} (for method {self.method!r})")
        if method.engine and backend not in installed_legacy_engines():
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
        for method in sorted(method_names(), key=len, reverse=True):
            if text == method:
                return cls(method)
            if text.startswith(method + "_"):
                return cls(method, text[len(method) + 1 :])
        raise invalid(
            "target",
            spec,
            f"'method[:backend]' with method one of {', '.join(method_names())} (see supported_targets())",
        )

    @property
    def name(self) -> str:
        """File-name friendly identifier, e.g. ``int8_dynamic_x86``; ``parse`` accepts it back."""
        return self.method if self.backend == "none" else f"{self.method}_{self.backend}"

    @property
    def spec(self):
        """The registered :class:`~pqv_lightning.quantization.methods.QuantizationMethod` of this target."""
        return get_method(self.method)

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def engine(self) -> str | None:
        """The ``torch.backends.quantized`` engine the quantized module must run under, if any."""
        return self.backend if self.spec.engine else None

    @property
    def calibrated(self) -> bool:
        """Whether this target calibrates activation ranges on images."""
        return self.spec.calibrated

    def __str__(self) -> str:
        return self.method if self.backend == "none" else f"{self.method}:{self.backend}"


def supported_targets() -> list[str]:
    """Target specs (``parse``-able) that this installation can build."""
    return [
        method.name if backend == "none" else f"{method.name}:{backend}"
        for method in list_methods()
        for backend in method.installed_backends()
    ]


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
            f"{' / '.join(m.name for m in list_methods() if not m.calibrated)})",
        )
    return parsed
