"""The quantization stage of the fit-end chain: its config, and the variants it builds and evaluates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from pqv_lightning.pipeline.data import CALIBRATION_SPLITS, StageData
from pqv_lightning.quantization import (
    GRANULARITIES,
    ROUNDINGS,
    LogitReference,
    MixedPrecision,
    QuantizationResult,
    QuantizationTarget,
    QuantizedModel,
    SensitivityAnalysis,
    SmoothingResult,
    analyze_sensitivity,
    parse_targets,
    quantize_and_evaluate,
    smooth_outliers,
)
from pqv_lightning.utils.checks import check_bool, check_choice, check_int, invalid
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
            are); with smoothing, also on the model before smoothing, to compare the rankings.
        granularity: ``"layer"`` or ``"block"``: the unit of the sensitivity analysis and of the budget.
        smoothing: move activation outliers into the weights first (:func:`~pqv_lightning.quantization.smooth_outliers`,
            exact in float, strength chosen per layer on the calibration batches); every variant and every file of
            the export stage is then built from the smoothed model, and the manifest lists the smoothed layers.
        rounding: ``"nearest"`` (what each runtime does) or ``"gptq"``: the linear weights of every target with
            integer weights rounded by GPTQ on the calibration batches, on the grid its runtime derives
            (:func:`~pqv_lightning.quantization.round_weights`).
        bias_correction: correct each linear layer's bias for the mean output shift its weight rounding causes.
        integer_first: with ``max_drop``, the cheapest recipe that keeps every layer integer comes first: plain,
            then smoothing, then smoothing + GPTQ + bias correction, each tried on every target and taken when every
            target's top-1 drop on the evaluation data is within ``max_drop``; float layers are chosen (on the last
            recipe) only when none is. The recipe taken holds for the files too; the manifest and the log say which.

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
    smoothing: bool = False
    rounding: str = "nearest"
    bias_correction: bool = False
    integer_first: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(parse_targets(self.targets, self.calibration_batches)))
        check_choice("calibration_split", self.calibration_split, CALIBRATION_SPLITS)
        check_int("eval_batches", self.eval_batches, 1, allow_none=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_bool("smoothing", self.smoothing)
        check_choice("rounding", self.rounding, ROUNDINGS)
        check_bool("bias_correction", self.bias_correction)
        check_bool("integer_first", self.integer_first)
        chosen = self.smoothing or self.rounds or self.float_layers or self.max_float_layers is not None
        if self.integer_first and (self.max_drop is None or chosen):
            raise invalid(
                "integer_first",
                self.integer_first,
                "True only with a max_drop budget and without smoothing, rounding, bias_correction, float_layers or "
                "max_float_layers (it chooses them)",
            )
        if self.calibrates_weights and not self.calibration_batches:
            raise invalid(
                "calibration_batches", self.calibration_batches, "at least 1 with smoothing, GPTQ or bias correction"
            )
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
    def rounds(self) -> bool:
        """Whether weights are rounded other than by the runtime (GPTQ, bias correction)."""
        return self.rounding != "nearest" or self.bias_correction

    @property
    def calibrates_weights(self) -> bool:
        """Whether smoothing or weight rounding reads calibration batches."""
        return self.smoothing or self.rounds or self.integer_first

    @property
    def calibrates(self) -> bool:
        """Whether some target calibrates on data (and ``calibration_batches`` gives it some)."""
        calibrated = self.calibrates_weights or any(t.calibrated for t in (*self.targets, *self.sensitivity))
        return bool(self.calibration_batches) and calibrated

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
    """What the quantization stage produced: the float model's metrics, the variants and the analyses; with
    smoothing, the smoothed model the later stages build from and what was done."""

    float_metrics: dict[str, float]
    results: list[QuantizationResult]
    sensitivity: list[SensitivityAnalysis]
    warnings: list[str]
    model: nn.Module | None = None
    smoothing: SmoothingResult | None = None
    rounding: tuple[str, bool] = ("nearest", False)
    recipe: str | None = None


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

    ladder = config is not None and config.integer_first
    smoothing = config is not None and (config.smoothing or ladder)
    steps = len(targets) + len(trained) + len(asked) + smoothing + (len(RECIPES) if ladder else 0)
    with progress.stage("quantization", steps):
        smoothed = None
        original = model
        if config is not None and config.smoothing:  # integer_first smooths only if the plain recipe misses
            smoothed = _smooth(model, calibration, config, warnings, progress)
            model = smoothed.model if smoothed is not None else model
        rounding = (config.rounding, config.bias_correction) if config is not None else ("nearest", False)
        recipe = None
        if ladder:
            recipe, rounding, smoothed, found = _integer_first(
                original, targets, val, calibration, config, warnings, progress
            )
            model = smoothed.model if smoothed is not None else original
            if found is not None:  # every layer integer within the budget: no float layers to plan
                float_metrics, results = found
                for result in results:
                    shown(result)
                targets, mixed = (), None
        if not ladder or targets:
            float_metrics, results = quantize_and_evaluate(
                model, targets, val, calibration, mixed, (), shown, rounding=rounding[0], bias_correction=rounding[1]
            )
        if trained:
            results += quantize_and_evaluate(model, (), val, None, None, trained, shown)[1]
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
        if smoothed is not None and model is smoothed.model:  # the ranking before smoothing, to compare
            before = LogitReference.of(original, val) if asked else None
            for target in asked:
                try:
                    analysis = analyze_sensitivity(original, target, before, calibration, config.granularity)
                    analyses.append(replace(analysis, model="before smoothing"))
                except Exception as err:
                    warnings.append(f"sensitivity of {target} before smoothing failed: {error_summary(err)}")
    return QuantizationOutcome(float_metrics, results, analyses, warnings, model, smoothed, rounding, recipe)


#: The every-layer-integer recipes ``integer_first`` tries, cheapest first:
#: (name, smoothing, rounding, bias correction).
RECIPES: tuple[tuple[str, bool, str, bool], ...] = (
    ("plain", False, "nearest", False),
    ("smoothing", True, "nearest", False),
    ("smoothing + GPTQ + bias correction", True, "gptq", True),
)


def _smooth(
    model: nn.Module, calibration: Sequence | None, config: QuantizationConfig, warnings: list[str], progress: Progress
) -> SmoothingResult | None:
    """:func:`smooth_outliers` as a step of the stage; ``None`` (and a warning) where it fails: the variants are
    then built from the model as it is."""
    try:
        smoothed = smooth_outliers(model, calibration, config.calibration_batches)
    except Exception as err:
        warnings.append(f"smoothing failed, the variants are built without it: {error_summary(err)}")
        progress.step("smoothing", "failed")
        return None
    progress.step("smoothing", smoothed.summary())
    return smoothed


def _integer_first(
    model: nn.Module,
    targets: Sequence[QuantizationTarget],
    val: Sequence,
    calibration: Sequence | None,
    config: QuantizationConfig,
    warnings: list[str],
    progress: Progress,
) -> tuple[str, tuple[str, bool], SmoothingResult | None, tuple | None]:
    """The first of :data:`RECIPES` under which every target stays within ``config.max_drop`` with every layer
    integer: its name, its rounding, the smoothing it uses and its ``(float metrics, results)``; the last recipe with
    ``"+ float layers"`` and no results if none does. The model is smoothed once, when the first recipe that needs
    it is reached."""
    smoothed, tried = None, False
    for name, smooth, rounding, correct in RECIPES:
        if smooth and not tried:
            smoothed, tried = _smooth(model, calibration, config, warnings, progress), True
        if smooth and smoothed is None:  # smoothing failed: the recipes that need it cannot be tried
            continue
        source = smoothed.model if smooth else model
        float_metrics, results = quantize_and_evaluate(
            source, targets, val, calibration, rounding=rounding, bias_correction=correct
        )
        drops = [100 * (float_metrics["top1"] - r.top1) if r.error is None else math.inf for r in results]
        worst = max(drops, default=0.0)
        progress.step(f"recipe {name}", f"largest top-1 drop {worst:.2f} points (budget {config.max_drop:g})")
        if worst <= config.max_drop:
            return name, (rounding, correct), smoothed if smooth else None, (float_metrics, results)
    return f"{name} + float layers", (rounding, correct), smoothed if smooth else None, None


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
