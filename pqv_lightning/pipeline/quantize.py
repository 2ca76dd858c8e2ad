"""The quantization stage of the fit-end chain: its config, and the variants it builds and evaluates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pqv_lightning.pipeline.data import CALIBRATION_SPLITS, StageData
from pqv_lightning.quantization import (
    GRANULARITIES,
    LogitReference,
    MixedPrecision,
    QuantizationResult,
    QuantizationTarget,
    QuantizedModel,
    SensitivityAnalysis,
    analyze_sensitivity,
    parse_targets,
    quantize_and_evaluate,
)
from pqv_lightning.utils.checks import check_choice, check_int, invalid
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.progress import Progress

__all__ = ["QuantizationConfig", "QuantizationOutcome", "quantization_meta", "quantization_stage"]


@dataclass(frozen=True)
class QuantizationConfig:
    """Post-training quantization variants of the trained model, each evaluated beside the float model.

    Args:
        targets: ``"method[:backend]"`` specs, e.g. ``"int8_dynamic:x86"``, ``"int8_static:qnnpack"``,
            ``"int8_pt2e:xnnpack"``, ``"fp16"``, ``"int4_weight"`` (see ``supported_targets()``); kept parsed.
        calibration_batches: batches of ``calibration_split`` that calibrate activation ranges
            (``int8_static``, ``int8_pt2e``).
        calibration_split: ``"train"`` or ``"val"``.
        eval_batches: validation batches to evaluate on (``None``: all).
        float_layers: layers kept in float by every target that quantizes layers (mixed precision): names or
            ``fnmatch`` globs of layers or blocks, e.g. ``["head", "blocks.*.mlp.fc2"]``; each must match a layer.
        max_float_layers: a float budget: at most this many layers (blocks with ``granularity="block"``) chosen
            in float, most sensitive first (alone: exactly this many).
        max_drop: a float budget: the fewest units in float, most sensitive first, that keep the top-1 drop against
            the float model at or below this many points on the evaluation data.
        sensitivity: targets whose per-layer sensitivity is measured and reported (the budgeted targets' always
            are).
        granularity: ``"layer"`` or ``"block"``: the unit of the sensitivity analysis and of the budget.

    Raises:
        InvalidArgumentError: a target this installation cannot build, a calibrated target without calibration
            batches, float layers with only whole-model casts, or any value out of range.

    Example::

        QuantizationConfig(targets=["int8_pt2e:xnnpack", "int4_weight"], calibration_batches=8, max_drop=0.5)
    """

    targets: tuple[QuantizationTarget, ...] = ("int8_dynamic:x86",)
    calibration_batches: int = 8
    calibration_split: str = "train"
    eval_batches: int | None = None
    float_layers: tuple[str, ...] = ()
    max_float_layers: int | None = None
    max_drop: float | None = None
    sensitivity: tuple[QuantizationTarget, ...] = ()
    granularity: str = "layer"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(parse_targets(self.targets, self.calibration_batches)))
        check_choice("calibration_split", self.calibration_split, CALIBRATION_SPLITS)
        check_int("eval_batches", self.eval_batches, 1, allow_none=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        mixed = MixedPrecision(tuple(self.float_layers), self.max_float_layers, self.max_drop, self.granularity)
        object.__setattr__(self, "float_layers", mixed.float_layers)
        if mixed.active and not any(t.spec.float_layers for t in self.targets):
            raise invalid(
                "targets",
                [str(t) for t in self.targets],
                "a target that quantizes layers, with float layers or a float budget (fp16 casts the whole model)",
            )
        sensitivity = () if not self.sensitivity else parse_targets(self.sensitivity, self.calibration_batches)
        for i, target in enumerate(sensitivity):
            if not target.spec.float_layers:
                raise invalid(f"sensitivity[{i}]", str(target), "a target that quantizes layers (not fp16)")
        object.__setattr__(self, "sensitivity", tuple(sensitivity))

    @property
    def calibrates(self) -> bool:
        """Whether some target calibrates on data (and ``calibration_batches`` gives it some)."""
        return bool(self.calibration_batches) and any(t.calibrated for t in (*self.targets, *self.sensitivity))

    @property
    def mixed_precision(self) -> MixedPrecision:
        return MixedPrecision(self.float_layers, self.max_float_layers, self.max_drop, self.granularity)

    def check_model(self, model: nn.Module) -> None:
        """Raise before any work when a float layer matches nothing in ``model`` or the budget cannot fit it."""
        mixed = self.mixed_precision
        if mixed.active:
            for target in self.targets:
                if target.spec.float_layers:
                    mixed.check_model(model, target.method)


@dataclass
class QuantizationOutcome:
    """What the quantization stage produced: the float model's metrics, the variants and the analyses."""

    float_metrics: dict[str, float]
    results: list[QuantizationResult]
    sensitivity: list[SensitivityAnalysis]
    warnings: list[str]


def quantization_stage(
    model: nn.Module,
    data: StageData,
    config: QuantizationConfig | None,
    trained: Sequence[QuantizedModel],
    progress: Progress | None = None,
) -> QuantizationOutcome:
    """The variants (float layers chosen first), the QAT variants, and the sensitivity analyses asked for; one
    ``progress`` step per variant and per analysis."""
    progress = progress or Progress.silent()
    val = data.batches("val", config.eval_batches if config is not None else None, "validation")
    calibration = None
    if config is not None and config.calibrates:
        split = config.calibration_split
        calibration = data.batches(split, config.calibration_batches, split)
    targets = config.targets if config is not None else ()
    mixed = config.mixed_precision if config is not None else None
    asked = [t for t in (config.sensitivity if config is not None else ())]
    warnings: list[str] = []

    def shown(result: QuantizationResult) -> None:
        note = f"failed: {result.error}" if result.error else f"top-1 {100 * result.top1:.2f}%"
        progress.step(result.name, f"{note} ({result.seconds:.1f} s)")

    with progress.stage("quantization", len(targets) + len(trained) + len(asked)):
        float_metrics, results = quantize_and_evaluate(model, targets, val, calibration, mixed, trained, shown)
        analyses = [r.plan.sensitivity for r in results if r.plan and r.plan.sensitivity]
        done = {(str(a.target), a.granularity) for a in analyses}
        wanted = [t for t in asked if (str(t), config.granularity) not in done]
        reference = LogitReference.of(model, val) if wanted else None
        for target in wanted:
            try:
                analyses.append(analyze_sensitivity(model, target, reference, calibration, config.granularity))
                progress.step(f"sensitivity of {target}")
            except Exception as err:  # a view of the variants: never lose them to it
                warnings.append(f"sensitivity of {target} failed: {error_summary(err)}")
                progress.step(f"sensitivity of {target}", "failed")
    return QuantizationOutcome(float_metrics, results, analyses, warnings)


def quantization_meta(float_metrics: dict[str, float], results: Sequence[QuantizationResult]) -> dict[str, Any]:
    """The quantization results as the manifest records them."""
    variants = {}
    for r in results:
        if r.error is not None:
            variants[r.name] = {"error": r.error}
            continue
        variants[r.name] = {"target": str(r.target), "origin": r.origin, "float_layers": r.float_layers, **r.metrics()}
        if r.plan is not None and r.plan.steps:
            variants[r.name]["float_budget"] = r.plan.as_dict()
    return {"float": dict(float_metrics), "variants": variants}
