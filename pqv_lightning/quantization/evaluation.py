"""Quantized variants measured against the float model: accuracy, agreement, and every target of a run at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pqv_lightning.quantization.mixed_precision import MixedPrecision, MixedPrecisionPlan, plan_float_layers
from pqv_lightning.quantization.ptq import QuantizedModel, quantize
from pqv_lightning.quantization.rounding import GRIDS
from pqv_lightning.quantization.sensitivity import LogitReference
from pqv_lightning.quantization.targets import QuantizationTarget
from pqv_lightning.utils.batches import images_of
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.modules import cpu_float_copy

__all__ = ["QuantizationResult", "evaluate", "quantize_and_evaluate", "results_table", "top1_agreement"]


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
            x = images_of(batch).cpu().float()
            same += int((reference(x).argmax(-1) == candidate(x).argmax(-1)).sum())
            total += x.shape[0]
    if total == 0:
        raise ValueError("top1_agreement() received no images.")
    return same / total


@dataclass
class QuantizationResult:
    """One quantized variant and its validation figures (``top1``/``top5`` as fractions, like ``val/top1``).

    ``top1_agreement`` is the fraction of validation images on which it predicts the float model's class.
    ``quantized`` is ``None`` and ``error`` says why when quantizing or evaluating failed. ``plan`` says how its
    float layers were chosen (mixed precision), ``origin`` whether it was post-training quantized (``"ptq"``) or
    converted from quantization-aware training (``"qat"``).
    """

    target: QuantizationTarget
    quantized: QuantizedModel | None
    top1: float | None = None
    top5: float | None = None
    top1_agreement: float | None = None
    seconds: float | None = None
    error: str | None = None
    plan: MixedPrecisionPlan | None = None
    origin: str = "ptq"

    @property
    def name(self) -> str:
        return f"qat_{self.target.name}" if self.origin == "qat" else self.target.name

    @property
    def float_layers(self) -> list[str]:
        return self.quantized.float_layers if self.quantized is not None else []

    def metrics(self) -> dict[str, float]:
        values = {"top1": self.top1, "top5": self.top5, "top1_agreement": self.top1_agreement}
        return {key: float(value) for key, value in values.items() if value is not None}


def _fractions(percent: dict[str, float]) -> dict[str, float]:
    return {key: value / 100.0 for key, value in percent.items()}


def quantize_and_evaluate(
    model: nn.Module,
    targets: Sequence[QuantizationTarget],
    val_batches: Sequence[tuple[Tensor, Tensor]],
    calibration: Sequence[tuple[Tensor, Tensor]] | None,
    mixed_precision: MixedPrecision | None = None,
    trained: Sequence[QuantizedModel] = (),
    on_result: Callable[[QuantizationResult], None] | None = None,
    rounding: str = "nearest",
    bias_correction: bool = False,
) -> tuple[dict[str, float], list[QuantizationResult]]:
    """Quantize a CPU copy of ``model`` for each target; evaluate the float model and every variant.

    With ``mixed_precision``, every target but ``fp16`` keeps its float layers (named, or chosen by the budget on
    ``val_batches``: see :func:`~pqv_lightning.quantization.plan_float_layers`). ``trained`` variants (converted
    from quantization-aware training) are evaluated after the targets, beside the same float model.
    Returns the float model's ``{"top1", "top5"}`` (fractions) and one result per target, then per trained
    variant, in order. A target that fails is recorded with its error and the others go on. ``model`` is never
    modified. ``on_result(result)`` is called as each result is final (e.g. to show progress). ``rounding`` and
    ``bias_correction`` (see :func:`~pqv_lightning.quantization.quantize`) apply to the targets with integer weights.
    """
    float_model = cpu_float_copy(model)
    float_metrics = _fractions(evaluate(float_model, val_batches))
    example = val_batches[0][0]
    mixed = mixed_precision if mixed_precision is not None and mixed_precision.active else None
    reference = LogitReference.of(float_model, val_batches) if mixed is not None and mixed.budgeted else None
    results = []
    for target in targets:
        start = time.perf_counter()
        plan = None
        try:
            keep: tuple[str, ...] = ()
            if mixed is not None and target.spec.float_layers:
                plan = plan_float_layers(float_model, target, mixed, reference or val_batches, calibration)
                keep = plan.float_layers
            rounds = f"{target.method}:{target.backend}" in GRIDS
            quantized = quantize(
                float_model,
                target,
                example,
                calibration,
                float_layers=keep,
                rounding=rounding if rounds else "nearest",
                bias_correction=bias_correction and rounds,
            )
            result = _evaluated(QuantizationResult(target, quantized, plan=plan), float_model, val_batches)
        except Exception as err:  # one bad variant must not lose the others at the end of a long fit
            result = QuantizationResult(target, None, error=error_summary(err), plan=plan)
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result is not None:
            on_result(result)
    for variant in trained:
        start = time.perf_counter()
        try:
            result = _evaluated(
                QuantizationResult(variant.target, variant, origin=variant.origin), float_model, val_batches
            )
        except Exception as err:
            result = QuantizationResult(variant.target, None, error=error_summary(err), origin=variant.origin)
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result is not None:
            on_result(result)
    return float_metrics, results


def _evaluated(
    result: QuantizationResult, float_model: nn.Module, val_batches: Sequence[tuple[Tensor, Tensor]]
) -> QuantizationResult:
    module = result.quantized.module
    metrics = _fractions(evaluate(module, val_batches))
    result.top1, result.top5 = metrics["top1"], metrics["top5"]
    result.top1_agreement = top1_agreement(float_model, module, val_batches)
    return result


def results_table(float_metrics: dict[str, float], results: Sequence[QuantizationResult]) -> str:
    """A Markdown table of the float model and every variant side by side (console and TensorBoard)."""
    rows = [
        "| variant | top-1 % | top-5 % | Δ top-1 | agreement | time s | float layers |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| float | {100 * float_metrics['top1']:.2f} | {100 * float_metrics['top5']:.2f} | | | | |",
    ]
    for r in results:
        if r.error is not None:
            rows.append(f"| {r.name} | failed: {r.error} | | | | | |")
            continue
        kept = r.float_layers
        shown = f"{len(kept)}: {', '.join(kept)}"[:120] if kept else ""
        rows.append(
            f"| {r.name} | {100 * r.top1:.2f} | {100 * r.top5:.2f} | {100 * (r.top1 - float_metrics['top1']):+.2f} "
            f"| {r.top1_agreement:.4f} | {r.seconds:.1f} | {shown} |"
        )
    return "\n".join(rows)
