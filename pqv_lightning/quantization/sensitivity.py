"""Per-layer (or per-block) quantization sensitivity: which layers cost the accuracy of a quantized model.

For one target, every unit (a layer, or the layers of a block, see :func:`~pqv_lightning.quantization.layers.units`)
is measured twice against the float model on the same images: quantized *alone* (every other layer in float:
the error that unit brings on its own) and left in float *alone* (everything else quantized: what keeping it in
float recovers). Each measurement gives top-1 accuracy, agreement with the float model's class, the KL divergence
of the quantized softmax from the float one and the logit SQNR in dB. Units are ranked by what keeping them in
float recovers (the drop in KL from the fully quantized model), the order a float budget follows
(:mod:`~pqv_lightning.quantization.mixed_precision`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pqv_lightning.quantization.layers import GRANULARITIES, quantizable_layers, units
from pqv_lightning.quantization.ptq import quantize
from pqv_lightning.quantization.targets import QuantizationTarget
from pqv_lightning.utils.checks import check_choice, invalid
from pqv_lightning.utils.modules import cpu_float_copy

__all__ = [
    "MODES",
    "LogitReference",
    "SensitivityAnalysis",
    "UnitSensitivity",
    "analyze_sensitivity",
    "logit_metrics",
]

MODES = ("quantized_alone", "float_alone")


@dataclass
class LogitReference:
    """The float model's logits on fixed ``(images, labels)`` batches: what every variant is compared with."""

    batches: list[tuple[Tensor, Tensor]]
    logits: list[Tensor]

    @classmethod
    def of(cls, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> LogitReference:
        batches = [(images.detach().cpu().float(), labels.detach().cpu()) for images, labels in batches]
        if not batches:
            raise ValueError("LogitReference needs at least one (images, labels) batch.")
        model = cpu_float_copy(model)
        with torch.no_grad():
            return cls(batches, [model(images).float() for images, _ in batches])

    @property
    def top1(self) -> float:
        """The float model's top-1 accuracy (a fraction)."""
        correct = sum(int((out.argmax(-1) == labels).sum()) for out, (_, labels) in zip(self.logits, self.batches))
        return correct / sum(len(labels) for _, labels in self.batches)


def logit_metrics(module: nn.Module, reference: LogitReference) -> dict[str, float]:
    """``top1`` and ``agreement`` (fractions), ``kl`` (nats, KL(float || variant) per image) and ``sqnr_db`` of the
    variant's logits against the float model's."""
    correct = agree = total = 0
    kl = signal = noise = 0.0
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for (images, labels), ref in zip(reference.batches, reference.logits, strict=True):
                out = module(images).float()
                pred = out.argmax(-1)
                correct += int((pred == labels).sum())
                agree += int((pred == ref.argmax(-1)).sum())
                total += labels.shape[0]
                kl += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="sum", log_target=True))
                signal += float((ref * ref).sum())
                noise += float(((out - ref) ** 2).sum())
    finally:
        module.train(was_training)
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    return {"top1": correct / total, "agreement": agree / total, "kl": kl / total, "sqnr_db": sqnr}


@dataclass
class UnitSensitivity:
    """One unit's measurements: ``quantized_alone`` and ``float_alone`` hold :func:`logit_metrics` (empty when
    that mode was not measured), ``error`` why a measurement failed."""

    unit: str
    layers: list[str]
    quantized_alone: dict[str, float] = field(default_factory=dict)
    float_alone: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def recovery(self, quantized_kl: float) -> float:
        """How much KL keeping this unit in float removes from the fully quantized model (higher: more sensitive);
        without a float-alone measurement, the KL it brings when quantized alone."""
        if "kl" in self.float_alone:
            return quantized_kl - self.float_alone["kl"]
        return self.quantized_alone.get("kl", -math.inf)


@dataclass
class SensitivityAnalysis:
    """The sensitivity of every unit of a model to ``target``, most sensitive first.

    ``float_top1`` is the float model's top-1, ``quantized`` the fully quantized model's :func:`logit_metrics`.
    """

    target: QuantizationTarget
    granularity: str
    float_top1: float
    quantized: dict[str, float]
    units: list[UnitSensitivity]
    images: int
    seconds: float
    modes: tuple[str, ...] = MODES
    #: which model was analysed when that is not the one quantized (``"before smoothing"``), else empty
    model: str = ""

    @property
    def key(self) -> str:
        """A name for files and tags: target, granularity and, if set, the model analysed."""
        suffix = f"_{self.model.replace(' ', '_')}" if self.model else ""
        return f"{self.target.name}_{self.granularity}{suffix}"

    def ranking(self) -> list[str]:
        """Unit names, most sensitive first (the order a float budget takes them in)."""
        return [u.unit for u in self.units]

    def layers_of(self, unit: str) -> list[str]:
        return next(u.layers for u in self.units if u.unit == unit)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "granularity": self.granularity,
            "model": self.model,
            "modes": list(self.modes),
            "images": self.images,
            "seconds": round(self.seconds, 2),
            "float_top1": self.float_top1,
            "quantized": dict(self.quantized),
            "units": [asdict(u) for u in self.units],
        }


def analyze_sensitivity(
    model: nn.Module,
    target: QuantizationTarget | str,
    batches: Sequence[tuple[Tensor, Tensor]] | LogitReference,
    calibration: Sequence[Any] | None = None,
    granularity: str = "layer",
    modes: Sequence[str] = MODES,
) -> SensitivityAnalysis:
    """Measure every unit of ``model`` quantized alone and left in float alone for ``target`` (see the module
    docstring) on ``batches`` (``(images, labels)``, or a :class:`LogitReference` of them); ``calibration`` as for
    :func:`~pqv_lightning.quantization.quantize`. ``model`` is never modified."""
    target = QuantizationTarget.parse(target) if isinstance(target, str) else target
    if not target.spec.float_layers:
        raise invalid("target", str(target), f"a target that quantizes layers ({target.method} casts the whole model)")
    check_choice("granularity", granularity, GRANULARITIES)
    modes = tuple(dict.fromkeys(modes if not isinstance(modes, str) else [modes]))
    for i, mode in enumerate(modes):
        check_choice(f"modes[{i}]", mode, MODES)
    if not modes:
        raise invalid("modes", list(modes), f"one or more of {', '.join(MODES)}")
    start = time.perf_counter()
    reference = batches if isinstance(batches, LogitReference) else LogitReference.of(model, batches)
    layers = quantizable_layers(model, target.method)
    grouped = units(layers, granularity)
    if len(grouped) < 2:
        raise invalid("granularity", granularity, f"a unit size that splits the model into 2 or more (it has {layers})")
    example = reference.batches[0][0][:1]

    def measure(keep: list[str]) -> dict[str, float]:
        variant = quantize(model, target, example, calibration, float_layers=keep)
        return logit_metrics(variant.module, reference)

    quantized = measure([])
    rows = []
    for unit, members in grouped.items():
        row = UnitSensitivity(unit, list(members))
        try:
            if "quantized_alone" in modes:
                row.quantized_alone = measure([layer for layer in layers if layer not in members])
            if "float_alone" in modes:
                row.float_alone = measure(list(members))
        except Exception as err:  # one unit that does not quantize must not lose the others
            row.error = f"{type(err).__name__}: {err}"
        rows.append(row)
    rows.sort(key=lambda r: (r.error is not None, -r.recovery(quantized["kl"])))
    return SensitivityAnalysis(
        target=target,
        granularity=granularity,
        float_top1=reference.top1,
        quantized=quantized,
        units=rows,
        images=sum(len(labels) for _, labels in reference.batches),
        seconds=time.perf_counter() - start,
        modes=modes,
    )
