"""The fit-end chain without Lightning: quantize -> export -> measure and report, in that order, once.

Three frozen configs say what each stage does (:class:`QuantizationConfig`, :class:`ExportConfig`,
:class:`ReportConfig`); :func:`run_pipeline` runs the stages that have a config on a trained model with its
validation (and calibration) data, and returns everything they produced in one :class:`PipelineResult`. A stage
that fails is recorded there and the later stages go on with what there is: at the end of a long fit nothing
already produced may be lost to a later failure.

The Lightning callbacks :class:`~pqv_lightning.callbacks.Quantization`, :class:`~pqv_lightning.callbacks.MobileExport`
and :class:`~pqv_lightning.callbacks.TradeoffReport` each hold one config, and the first of them to reach fit end
runs this chain for all of them; ``pqv-export`` and ``pqv-sweep`` call it directly.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqv_lightning.checkpoint import current_structure
from pqv_lightning.export import (
    AOTI_PRECISIONS,
    DEFAULT_FORMATS,
    EXECUTORCH_PRECISIONS,
    ONNX_PRECISIONS,
    ArtifactRecord,
    check_attention,
    export_artifacts,
    validate_formats,
    validate_precisions,
    write_manifest,
)
from pqv_lightning.measure import operator_profile
from pqv_lightning.quantization import (
    GRANULARITIES,
    LogitReference,
    MixedPrecision,
    QuantizationResult,
    QuantizationTarget,
    QuantizedModel,
    SensitivityAnalysis,
    analyze_sensitivity,
    evaluate,
    parse_targets,
    quantize_and_evaluate,
    resolve_float_layers,
    top1_agreement,
)
from pqv_lightning.report import EagerVariant, TradeoffPoint, measure_tradeoffs, write_report
from pqv_lightning.utils.batches import collect_batches
from pqv_lightning.utils.checks import check_bool, check_choice, check_int, invalid
from pqv_lightning.utils.errors import error_summary

__all__ = [
    "CALIBRATION_SPLITS",
    "MANIFEST_NAME",
    "ExportConfig",
    "ExportOutcome",
    "PipelineResult",
    "QuantizationConfig",
    "ReportConfig",
    "artifacts_table",
    "export_float_layers",
    "export_stage",
    "run_pipeline",
]

CALIBRATION_SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"


def _check_output_dir(value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise invalid("output_dir", value, "None (the default folder) or a folder path")
    return Path(value)


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
        float_layers: layers kept in float by every target but ``fp16`` (mixed precision): names or ``fnmatch``
            globs of layers or blocks, e.g. ``["head", "blocks.*.mlp.fc2"]``; each must match a layer.
        max_float_layers: a float budget: at most this many layers (blocks with ``granularity="block"``) chosen
            in float, most sensitive first (alone: exactly this many).
        max_drop: a float budget: the fewest units in float, most sensitive first, that keep the top-1 drop against
            the float model at or below this many points on the evaluation data.
        sensitivity: targets whose per-layer sensitivity is measured and reported (the budgeted targets' always
            are).
        granularity: ``"layer"`` or ``"block"``: the unit of the sensitivity analysis and of the budget.
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
        if mixed.active and all(t.method == "fp16" for t in self.targets):
            raise invalid("targets", [str(t) for t in self.targets], "a target that quantizes layers, with float "
                          "layers or a float budget (fp16 casts the whole model)")  # fmt: skip
        sensitivity = () if not self.sensitivity else parse_targets(self.sensitivity, self.calibration_batches)
        for i, target in enumerate(sensitivity):
            if target.method == "fp16":
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
                if target.method != "fp16":
                    mixed.check_model(model, target.method)


@dataclass(frozen=True)
class ExportConfig:
    """Deployable files of the trained model and of its TorchScript-able quantized variants, each verified.

    Args:
        formats: any of ``"torchscript"``, ``"lite"``, ``"executorch"``, ``"onnx"``, ``"aoti"`` (an AOTInductor
            ``.pt2`` package compiled for this x86 CPU; needs a C++ compiler).
        output_dir: where the files and ``manifest.json`` go (the Lightning face defaults it to the log dir).
        executorch_precisions: ``"fp32"``, ``"int8"`` (static, calibrated), ``"int8_dynamic"``, ``"int4"``.
        onnx_precisions: ``"fp32"``, ``"int8"`` (onnxruntime dynamic), ``"int8_qdq"`` (static, calibrated).
        val_batches: validation batches every artifact is verified on (``None``: all).
        batch_size: the fixed batch size the files are exported for.
        calibration_batches: batches of ``calibration_split`` for the calibrated precisions.
        calibration_split: ``"train"`` or ``"val"``.
        prefix: file name prefix (``<prefix><variant>.<ext>``).
        float_layers: layers the quantized ExecuTorch and ONNX files keep in float (names or globs of layers or
            blocks). Empty: those of the matching ``Quantization`` target when there is one (``int8_pt2e:xnnpack``
            for executorch int8, ``int4_weight`` for int4, ``int8_dynamic`` for onnx int8, ``int8_static`` for
            onnx int8_qdq, ``int8_pt2e:x86`` for aoti int8), else none.
        aoti_precisions: ``"fp32"``, ``"int8"`` (PT2E x86, static, calibrated; oneDNN int8 kernels).
        executorch_attention: ``"fp32"`` or ``"fp16"``: the dtype of the attention products and softmax in every
            ``.pte`` (fp16 runs natively where the CPU has fp16 arithmetic: ARMv8.2 phones, AVX512-FP16).
    """

    formats: tuple[str, ...] = DEFAULT_FORMATS
    output_dir: Path | None = None
    executorch_precisions: tuple[str, ...] = ("fp32", "int8", "int4")
    onnx_precisions: tuple[str, ...] = ("fp32", "int8")
    val_batches: int | None = None
    batch_size: int = 1
    calibration_batches: int = 8
    calibration_split: str = "train"
    prefix: str = "model_"
    float_layers: tuple[str, ...] = ()
    aoti_precisions: tuple[str, ...] = ("fp32", "int8")
    executorch_attention: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_layers", MixedPrecision(tuple(self.float_layers)).float_layers)
        object.__setattr__(self, "formats", validate_formats(self.formats))
        et = validate_precisions(self.executorch_precisions, EXECUTORCH_PRECISIONS, "executorch")
        object.__setattr__(self, "executorch_precisions", et)
        onnx = validate_precisions(self.onnx_precisions, ONNX_PRECISIONS, "onnx")
        object.__setattr__(self, "onnx_precisions", onnx)
        aoti = validate_precisions(self.aoti_precisions, AOTI_PRECISIONS, "aoti")
        object.__setattr__(self, "aoti_precisions", aoti)
        et_asked = self.executorch_precisions if "executorch" in self.formats else ()
        check_attention(self.executorch_attention, et_asked, "executorch_attention")
        object.__setattr__(self, "output_dir", _check_output_dir(self.output_dir))
        check_int("val_batches", self.val_batches, 1, allow_none=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("calibration_batches", self.calibration_batches, 0)
        if self.calibration_batches == 0 and self.needs_calibration:
            raise invalid(
                "calibration_batches",
                0,
                "an int >= 1, because executorch 'int8' / onnx 'int8_qdq' / aoti 'int8' calibrate on data (or drop "
                "those precisions)",
            )
        check_choice("calibration_split", self.calibration_split, CALIBRATION_SPLITS)
        prefix = self.prefix
        if not isinstance(prefix, str) or os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise invalid("prefix", prefix, "a file name prefix without path separators")

    def artifact_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pqv_lightning.export.export_artifacts` this config sets."""
        return {
            "executorch_precisions": self.executorch_precisions,
            "onnx_precisions": self.onnx_precisions,
            "aoti_precisions": self.aoti_precisions,
            "executorch_attention": self.executorch_attention,
            "prefix": self.prefix,
        }

    def check_model(self, model: nn.Module) -> None:
        """Raise before any work when a float layer matches nothing in ``model``, or when fp16 attention is asked
        of a model without attention blocks the ``.pte`` rewrite knows."""
        resolve_float_layers(model, self.float_layers, "int8_pt2e")
        if self.executorch_attention != "fp32" and "executorch" in self.formats and self.executorch_precisions:
            from pqv_lightning.export.xnnpack_rewrites import check_attention_blocks

            check_attention_blocks(model, self.executorch_attention, "executorch_attention")

    @property
    def needs_calibration(self) -> bool:
        """Whether these formats and precisions calibrate on images (ExecuTorch and AOTI static int8, ONNX QDQ)."""
        return (
            ("executorch" in self.formats and "int8" in self.executorch_precisions)
            or ("onnx" in self.formats and "int8_qdq" in self.onnx_precisions)
            or ("aoti" in self.formats and "int8" in self.aoti_precisions)
        )


@dataclass(frozen=True)
class ReportConfig:
    """The latency / memory / accuracy trade-off of every variant, measured in its own runtime.

    Args:
        output_dir: where ``report.md``, ``report.json`` and the plots go.
        threads: threads of every runtime (fixed and stated in the report).
        warmup, runs: untimed and timed calls per variant at batch 1.
        batch: the larger batch measured too (``None``: batch 1 only).
        memory: measure each file's peak RSS in a fresh process (a few seconds per file).
        profile: per-operator profile of ``"fastest"`` (the fastest verified file), a variant name, or ``None``.
        profile_top: operators shown in the profile.
        include_dense: measure the dense model the network was pruned from, when there is one.
        val_batches: validation batches the eager variants are evaluated on (``None``: all).
    """

    output_dir: Path | None = None
    threads: int = 1
    warmup: int = 10
    runs: int = 50
    batch: int | None = 16
    memory: bool = True
    profile: str | None = "fastest"
    profile_top: int = 15
    include_dense: bool = True
    val_batches: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", _check_output_dir(self.output_dir))
        check_int("threads", self.threads, 1)
        check_int("warmup", self.warmup, 0)
        check_int("runs", self.runs, 1)
        check_int("batch", self.batch, 2, allow_none=True)
        check_int("profile_top", self.profile_top, 1)
        check_int("val_batches", self.val_batches, 1, allow_none=True)
        check_bool("memory", self.memory)
        check_bool("include_dense", self.include_dense)
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile):
            raise invalid("profile", self.profile, "'fastest', a variant name, or None")

    def measure_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pqv_lightning.report.measure_tradeoffs` this config sets."""
        return {k: getattr(self, k) for k in ("threads", "warmup", "runs", "batch", "memory")}


@dataclass
class ExportOutcome:
    """What the export stage produced: one record per artifact, the manifest, and a whole-stage error."""

    records: list[ArtifactRecord] = field(default_factory=list)
    manifest: Path | None = None
    error: str | None = None


@dataclass
class PipelineResult:
    """Everything one run of the chain produced; a stage that did not run or failed leaves its defaults."""

    float_metrics: dict[str, float] = field(default_factory=dict)
    quantization: list[QuantizationResult] = field(default_factory=list)
    quantization_error: str | None = None
    sensitivity: list[SensitivityAnalysis] = field(default_factory=list)
    export: ExportOutcome = field(default_factory=ExportOutcome)
    points: list[TradeoffPoint] = field(default_factory=list)
    report_files: dict[str, Path] = field(default_factory=dict)
    report_error: str | None = None
    profile_error: str | None = None
    warnings: list[str] = field(default_factory=list)

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


def artifacts_table(records: Sequence[ArtifactRecord]) -> str:
    """A Markdown table of the exported files: status, parity with the eager float model, accuracy, size."""

    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    rows = [
        "| artifact | format | precision | status | agreement | max abs diff | top-1 | size KiB | note |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        size = None if r.size_bytes is None else r.size_bytes / 1024
        note = (r.reason or "").replace("|", "/")[:160]
        rows.append(
            f"| {r.name} | {r.format} | {r.precision} | {r.status} | {num(r.top1_agreement, '.4f')} "
            f"| {num(r.max_abs_logit_diff, '.3g')} | {num(r.val_top1, '.4f')} | {num(size, '.1f')} | {note} |"
        )
    return "\n".join(rows)


def export_stage(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: ExportConfig,
    val_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    quantized: Sequence[QuantizationResult] = (),
    calibration: Sequence[torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> ExportOutcome:
    """Export a CPU copy of ``model`` (and the TorchScript-able ``quantized`` variants), verify every file, and
    write the manifest.

    Never raises for a failure of the export itself: per-artifact failures are in the records, and a failure
    of the whole call is the outcome's ``error`` (also written to the manifest's ``meta.error``).
    """
    out = Path(out_dir)
    manifest = out / MANIFEST_NAME
    variants = [r.quantized for r in quantized if r.quantized is not None]
    float_model = copy.deepcopy(model).cpu().float().eval()
    batch_size = config.batch_size
    example = val_batches[0][0][:batch_size]
    if example.shape[0] < batch_size:
        example = torch.cat([example, example[-1:].expand(batch_size - example.shape[0], *example.shape[1:])])
    float_layers = export_float_layers(config, quantized)
    meta = dict(meta or {})
    meta.update(
        formats=list(config.formats),
        executorch_precisions=list(config.executorch_precisions),
        onnx_precisions=list(config.onnx_precisions),
        aoti_precisions=list(config.aoti_precisions),
        executorch_attention=config.executorch_attention,
        batch_size=batch_size,
        verified_on_images=sum(int(labels.shape[0]) for _, labels in val_batches),
        quantized_variants=[q.name for q in variants],
        parameters=sum(p.numel() for p in float_model.parameters()),
        pruned=current_structure(model) is not None,
        float_layers={key: list(layers) for key, layers in float_layers.items() if layers},
    )
    outcome = ExportOutcome(manifest=manifest)
    unwritten: list[str] = []

    def record_progress(records: list[ArtifactRecord]) -> None:
        # the manifest after every final record, so that a killed export still leaves what it verified
        try:
            write_manifest(records, manifest, {**meta, "complete": False})
        except OSError as err:
            unwritten.append(error_summary(err))

    start = time.perf_counter()
    try:
        outcome.records = export_artifacts(
            float_model, out, config.formats, example.contiguous(), val_batches, quantized=variants,
            calibration=calibration, on_record=record_progress, float_layers=float_layers,
            **config.artifact_options(),
        )  # fmt: skip
    except Exception as err:  # the fit is over: report the failure, never lose the trained model to it
        outcome.error = error_summary(err)
        meta["error"] = outcome.error
    meta["export_seconds"] = round(time.perf_counter() - start, 2)
    try:
        write_manifest(outcome.records, manifest, {**meta, "complete": True})
    except OSError as err:
        unwritten.append(error_summary(err))
    if unwritten:
        outcome.error = (outcome.error + "; " if outcome.error else "") + f"manifest not written: {unwritten[-1]}"
    return outcome


#: The Quantization target whose float layers each quantized file keeps, when ExportConfig names none.
_FILE_TARGETS = {
    "executorch-int8": "int8_pt2e:xnnpack",
    "executorch-int8_dynamic": "int8_pt2e:xnnpack",
    "executorch-int4": "int4_weight",
    "onnx-int8": "int8_dynamic",
    "onnx-int8_qdq": "int8_static",
    "aoti-int8": "int8_pt2e:x86",
}


def export_float_layers(config: ExportConfig, results: Sequence[QuantizationResult]) -> dict[str, tuple[str, ...]]:
    """The float layers of each quantized file: the export config's own, else those of the matching quantization
    target (e.g. chosen by a float budget), so that the files ship the precision the variant was measured at."""
    if config.float_layers:
        return dict.fromkeys(_FILE_TARGETS, config.float_layers)
    chosen: dict[str, tuple[str, ...]] = {}
    for key, spec in _FILE_TARGETS.items():
        match = next(
            (r for r in results if r.origin == "ptq" and r.quantized is not None and
             (str(r.target) == spec or r.target.method == spec)), None,
        )  # fmt: skip
        chosen[key] = tuple(match.float_layers) if match is not None else ()
    return chosen


def _quantization_meta(float_metrics: dict[str, float], results: Sequence[QuantizationResult]) -> dict[str, Any]:
    variants = {}
    for r in results:
        if r.error is not None:
            variants[r.name] = {"error": r.error}
            continue
        variants[r.name] = {"target": str(r.target), "origin": r.origin, "float_layers": r.float_layers, **r.metrics()}
        if r.plan is not None and r.plan.steps:
            variants[r.name]["float_budget"] = r.plan.as_dict()
    return {"float": dict(float_metrics), "variants": variants}


class _Data:
    """The validation and training loaders, read per stage in the order the stages ask (each its own count)."""

    def __init__(self, val: Iterable, train: Iterable | None) -> None:
        self._loaders = {"val": val, "train": train}

    def batches(self, split: str, count: int | None, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = self._loaders[split]
        if loader is None:
            raise RuntimeError(f"No {split} data: {what} needs a {split} data loader.")
        return collect_batches(loader, count, what)


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
) -> PipelineResult:
    """Run quantize -> export -> measure/report (the stages given a config) on ``model``; never modifies it.

    ``export.output_dir`` and ``report.output_dir`` must be set. ``dense_model`` is the network ``model`` was
    pruned from (the report's dense row, with ``report.include_dense``). ``manifest_meta`` is plain data about
    the run recorded in the manifest (with the quantization results added); ``report_context`` feeds the
    report's title and notes (``epoch``, ``global_step``, ``pruning``, ``distillation``, ``weights``, ``note``).
    Each stage reads its own validation and calibration batches, in the order quantization, export, report.
    ``trained`` variants (converted from quantization-aware training) are evaluated beside the targets (also
    without a quantization config), exported where their format takes them, and measured.
    """
    for name, config in (("export", export), ("report", report)):
        if config is not None and config.output_dir is None:
            raise invalid(f"{name}.output_dir", None, "a folder path")
    context = dict(report_context or {})
    data = _Data(val_loader, train_loader)
    result = PipelineResult()
    if quantization is not None or trained:
        try:
            _quantization_stage(result, model, data, quantization, trained)
        except Exception as err:  # the export and report still run, without the quantized variants
            result.quantization_error = error_summary(err)
    if export is not None:
        export_meta = dict(manifest_meta or {})
        if quantization is not None:
            export_meta["quantization"] = _quantization_meta(result.float_metrics, result.quantization)
        try:
            val = data.batches("val", export.val_batches, "validation")
            calibration = None
            if export.calibration_batches and export.needs_calibration:
                images = data.batches(export.calibration_split, export.calibration_batches, "calibration")
                calibration = [x for x, _ in images]
        except Exception as err:
            result.export = ExportOutcome(error=f"nothing exported, the data could not be read: {error_summary(err)}")
        else:
            result.export = export_stage(
                model, export.output_dir, export, val, result.quantization, calibration, export_meta
            )
    if report is not None:
        try:
            _report_stage(result, model, data, report, dense_model, context)
        except Exception as err:  # the report is a view of what was produced: never lose the rest to it
            result.report_error = error_summary(err)
    return result


def _quantization_stage(
    result: PipelineResult,
    model: nn.Module,
    data: _Data,
    config: QuantizationConfig | None,
    trained: Sequence[QuantizedModel],
) -> None:
    """The variants (float layers chosen first), the QAT variants, and the sensitivity analyses asked for."""
    val = data.batches("val", config.eval_batches if config is not None else None, "validation")
    calibration = None
    if config is not None and config.calibrates:
        split = config.calibration_split
        calibration = data.batches(split, config.calibration_batches, split)
    targets = config.targets if config is not None else ()
    mixed = config.mixed_precision if config is not None else None
    result.float_metrics, result.quantization = quantize_and_evaluate(model, targets, val, calibration, mixed, trained)
    result.sensitivity = [r.plan.sensitivity for r in result.quantization if r.plan and r.plan.sensitivity]
    done = {(str(a.target), a.granularity) for a in result.sensitivity}
    wanted = [t for t in (config.sensitivity if config is not None else ()) if (str(t), config.granularity) not in done]
    reference = LogitReference.of(model, val) if wanted else None
    for target in wanted:
        try:
            result.sensitivity.append(analyze_sensitivity(model, target, reference, calibration, config.granularity))
        except Exception as err:  # a view of the variants: never lose them to it
            result.warnings.append(f"sensitivity of {target} failed: {error_summary(err)}")


def _report_stage(
    result: PipelineResult,
    model: nn.Module,
    data: _Data,
    config: ReportConfig,
    dense_model: nn.Module | None,
    context: dict[str, Any],
) -> None:
    model = copy.deepcopy(model).cpu().float().eval()
    val = data.batches("val", config.val_batches, "validation")
    network = "pruned" if current_structure(model) is not None else "float"
    quantized = [
        EagerVariant(
            f"{r.name} eager",
            network,
            r.target.method,
            r.quantized.module,
            backend=r.target.backend or "-",
            top1=r.top1,
            top5=r.top5,
            agreement=r.top1_agreement,
        )
        for r in result.quantization
        if r.quantized is not None
    ]
    float_metrics = result.float_metrics or {k: v / 100 for k, v in evaluate(model, val).items()}
    eager = [
        EagerVariant(
            f"{network} fp32 eager",
            network,
            "fp32",
            model,
            top1=float_metrics.get("top1"),
            top5=float_metrics.get("top5"),
            agreement=1.0,
        )
    ]
    networks: dict[str, nn.Module] = {network: model}
    if dense_model is not None and config.include_dense:
        dense = copy.deepcopy(dense_model).cpu().float().eval().requires_grad_(False)
        metrics = evaluate(dense, val)
        eager.insert(
            0,
            EagerVariant(
                "dense fp32 eager",
                "dense",
                "fp32",
                dense,
                top1=metrics["top1"] / 100,
                top5=metrics["top5"] / 100,
                agreement=top1_agreement(model, dense, val),
            ),
        )
        networks["dense"] = dense
    eager += quantized
    example = val[0][0][:1]
    previous_threads = torch.get_num_threads()
    try:
        result.points = measure_tradeoffs(
            eager, result.export.records, example, networks=networks, files_network=network,
            **config.measure_options(),
        )  # fmt: skip
        profile, profile_of = _profile(result, config, example, eager)
    finally:
        torch.set_num_threads(previous_threads)
    report_meta: dict[str, Any] = {
        "title": f"{type(model).__name__}, {network} network, epoch {context.get('epoch', '-')}",
        "threads": config.threads,
        "warmup": config.warmup,
        "runs": config.runs,
        "val_images": sum(int(labels.shape[0]) for _, labels in val),
        "global_step": context.get("global_step"),
    }
    keys = ("pruning", "distillation", "quantization_aware_training", "weights", "note")
    report_meta.update({k: context[k] for k in keys if context.get(k)})
    half = [r.name for r in result.export.records if r.extra.get("attention") == "fp16"]
    if half:
        report_meta["attention"] = (
            f"{', '.join(half)} compute their attention products in fp16 where the CPU has fp16 arithmetic, in fp32 "
            "elsewhere (the accuracy of the eager model with fp16 attention is in the manifest: extra.attention_eager)"
        )
    if result.profile_error:
        report_meta["operator_profile_error"] = result.profile_error
    result.report_files = write_report(
        result.points, config.output_dir, report_meta, profile, profile_of, sensitivity=result.sensitivity
    )


def _profile(
    result: PipelineResult, config: ReportConfig, example: torch.Tensor, eager: list[EagerVariant]
) -> tuple[list, str | None]:
    """The operator profile the report shows: of the fastest verified file, or of the variant named."""
    if config.profile is None:
        return [], None
    measured = [p for p in result.points if p.latency is not None and p.status == "ok"]
    if config.profile == "fastest":
        files = [p for p in measured if p.path]
        chosen = min(files or measured, key=lambda p: p.latency_ms, default=None)
    else:
        chosen = next((p for p in measured if p.name == config.profile), None)
        if chosen is None:
            names = ", ".join(p.name for p in measured)
            result.warnings.append(f"profile={config.profile!r} is not a measured variant; these are: {names}")
            return [], None
    if chosen is None:
        return [], None
    target: Any = chosen.path if chosen.path else next(v.module for v in eager if v.name == chosen.name)
    engine = (
        chosen.backend if chosen.runtime in ("torchscript", "lite") and chosen.precision.startswith("int8") else None
    )
    try:
        ops = operator_profile(target, chosen.runtime, example, config.profile_top, config.threads, engine=engine)
    except Exception as err:  # a profiler that fails leaves the rest of the report intact
        result.profile_error = f"operator profile of {chosen.name} failed: {error_summary(err)}"
        return [], None
    return ops, f"{chosen.name} ({chosen.runtime}, {config.threads} thread(s))"
