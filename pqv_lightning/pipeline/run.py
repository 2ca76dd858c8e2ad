"""The fit-end chain run once: quantize -> export -> measure and report, and everything it produced."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pqv_lightning.pipeline.data import StageData
from pqv_lightning.pipeline.export import ExportConfig, ExportOutcome, export_stage
from pqv_lightning.pipeline.quantize import QuantizationConfig, quantization_meta, quantization_stage
from pqv_lightning.pipeline.report import Produced, ReportConfig, report_stage
from pqv_lightning.quantization import QuantizationResult, QuantizedModel, SensitivityAnalysis, SmoothingResult
from pqv_lightning.report import TradeoffPoint
from pqv_lightning.utils.checks import invalid
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.progress import Progress

__all__ = ["PipelineResult", "run_pipeline"]


@dataclass
class PipelineResult:
    """Everything one run of the chain produced; a stage that did not run or failed leaves its defaults."""

    float_metrics: dict[str, float] = field(default_factory=dict)
    quantization: list[QuantizationResult] = field(default_factory=list)
    quantization_error: str | None = None
    sensitivity: list[SensitivityAnalysis] = field(default_factory=list)
    smoothing: SmoothingResult | None = None
    #: the weight rounding and bias correction the variants and the files were built with
    rounding: tuple[str, bool] = ("nearest", False)
    #: the every-layer-integer recipe ``QuantizationConfig(integer_first=True)`` took
    recipe: str | None = None
    export: ExportOutcome = field(default_factory=ExportOutcome)
    points: list[TradeoffPoint] = field(default_factory=list)
    report_files: dict[str, Path] = field(default_factory=dict)
    report_error: str | None = None
    profile_error: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: seconds per stage that ran
    elapsed: dict[str, float] = field(default_factory=dict)

    def shortfalls(self, stages: Sequence[str]) -> dict[str, str]:
        """For each of ``stages`` (``"quantization"``, ``"export"``, ``"report"``) that produced nothing usable,
        why, in a few words: no quantized variant, no verified file, or no report."""
        missing: dict[str, str] = {}
        if "quantization" in stages and not any(r.quantized is not None for r in self.quantization):
            errors = [self.quantization_error] if self.quantization_error else [r.error for r in self.quantization]
            missing["quantization"] = "no quantized variant: " + ("; ".join(e for e in errors if e) or "none ran")
        if "export" in stages and not any(r.status == "ok" for r in self.export.records):
            failed = [f"{r.name}: {r.reason}" for r in self.export.records if r.status == "failed"][:3]
            why = self.export.error or "; ".join(failed) or "no file was written"
            missing["export"] = f"no verified file: {why}"
        if "report" in stages and (self.report_error is not None or not self.report_files):
            missing["report"] = f"no report: {self.report_error or 'nothing was measured'}"
        return missing


def run_pipeline(
    model: nn.Module,
    val_loader: Iterable,
    train_loader: Iterable | None = None,
    *,
    quantization: QuantizationConfig | None = None,
    export: ExportConfig | None = None,
    report: ReportConfig | None = None,
    dense_model: nn.Module | None = None,
    manifest_meta: dict[str, Any] | None = None,
    report_context: dict[str, Any] | None = None,
    trained: Sequence[QuantizedModel] = (),
    progress: Progress | None = None,
) -> PipelineResult:
    """Run quantize -> export -> measure/report (the stages given a config) on ``model``; never modifies it.

    ``export.output_dir`` and ``report.output_dir`` must be set. ``dense_model`` is the network ``model`` was
    pruned from (the report's dense row, with ``report.include_dense``). ``manifest_meta`` is plain data about
    the run recorded in the manifest (with the quantization results added); ``report_context`` feeds the
    report's title and notes (``epoch``, ``global_step``, ``pruning``, ``distillation``, ``weights``, ``note``).
    Each stage reads its own validation and calibration batches, in the order quantization, export, report.
    ``trained`` variants (converted from quantization-aware training) are evaluated beside the targets (also
    without a quantization config), exported where their format takes them, and measured. ``progress`` shows each
    stage and each of its steps as they finish (``None``: silent), and the time per stage at the end.

    A stage that fails is recorded in the result and the later stages go on with what there is.

    Raises:
        InvalidArgumentError: an export or report config without ``output_dir`` (before any work).

    Example::

        result = run_pipeline(model, val_loader, train_loader,
                              quantization=QuantizationConfig(targets=["int8_pt2e:xnnpack"]),
                              export=ExportConfig(artifacts={"executorch": ["int8"]}, output_dir="artifacts"))
    """
    for name, config in (("export", export), ("report", report)):
        if config is not None and config.output_dir is None:
            raise invalid(f"{name}.output_dir", None, "a folder path")
    context = dict(report_context or {})
    data = StageData(val_loader, train_loader)
    result = PipelineResult()
    progress = progress or Progress.silent()
    if quantization is not None or trained:
        try:
            outcome = quantization_stage(model, data, quantization, trained, progress)
        except Exception as err:  # the export and report still run, without the quantized variants
            result.quantization_error = error_summary(err)
        else:
            result.float_metrics, result.quantization = outcome.float_metrics, outcome.results
            result.sensitivity = outcome.sensitivity
            result.warnings += outcome.warnings
            result.rounding, result.recipe = outcome.rounding, outcome.recipe
            if outcome.smoothing is not None:  # the same function: later stages build their files from it
                model, result.smoothing = outcome.model, outcome.smoothing
                context["smoothing"] = outcome.smoothing.summary()
            if outcome.recipe is not None:
                context["quantization_recipe"] = outcome.recipe
    if export is not None:
        export_meta = dict(manifest_meta or {})
        if quantization is not None:
            export_meta["quantization"] = quantization_meta(result.float_metrics, result.quantization)
        if result.smoothing is not None:
            export_meta["smoothing"] = result.smoothing.as_dict()
        if result.recipe is not None:
            export_meta["quantization_recipe"] = result.recipe
        try:
            val = data.batches("val", export.val_batches, "validation")
            calibration = None
            rounds = result.rounding != ("nearest", False)
            if export.calibration_batches and (export.needs_calibration or rounds):
                images = data.batches(export.calibration_split, export.calibration_batches, "calibration")
                calibration = [x for x, _ in images]
        except Exception as err:
            result.export = ExportOutcome(error=f"nothing exported, the data could not be read: {error_summary(err)}")
        else:
            result.export = export_stage(
                model, export.output_dir, export, val, result.quantization, calibration, export_meta, progress,
                result.rounding,
            )  # fmt: skip
    if report is not None:
        produced = Produced(result.float_metrics, result.quantization, result.sensitivity, result.export.records)
        try:
            outcome = report_stage(model, data, report, produced, dense_model, context, progress)
        except Exception as err:  # the report is a view of what was produced: never lose the rest to it
            result.report_error = error_summary(err)
        else:
            result.points, result.report_files = outcome.points, outcome.files
            result.profile_error = outcome.profile_error
            result.warnings += outcome.warnings
    result.elapsed = dict(progress.elapsed)
    progress.finish()
    return result
