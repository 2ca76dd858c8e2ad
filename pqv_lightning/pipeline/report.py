"""The report stage of the fit-end chain: every variant measured in its own runtime, and the report written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqv_lightning.checkpoint import current_structure
from pqv_lightning.export import ArtifactRecord
from pqv_lightning.export.formats import format_names, get_format
from pqv_lightning.measure import operator_profile
from pqv_lightning.pipeline.data import StageData, check_stage_dir
from pqv_lightning.quantization import QuantizationResult, SensitivityAnalysis, evaluate, top1_agreement
from pqv_lightning.report import CONTEXT_KEYS, EagerVariant, TradeoffPoint, measure_tradeoffs, write_report
from pqv_lightning.utils.checks import check_bool, check_int, invalid
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.modules import cpu_float_copy
from pqv_lightning.utils.progress import Progress

__all__ = ["Produced", "ReportConfig", "ReportOutcome", "report_stage"]


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

    Raises:
        InvalidArgumentError: a value out of range, or a ``profile`` that is neither ``"fastest"``, a name nor None.

    Example::

        ReportConfig(output_dir="report", threads=2, runs=100, batch=None)
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
        object.__setattr__(self, "output_dir", check_stage_dir(self.output_dir))
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
class ReportOutcome:
    """What the report stage produced: a measured point per variant, the written files, and what went wrong."""

    points: list[TradeoffPoint] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    profile_error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Produced:
    """What the stages before the report produced: the float model's metrics, the quantized variants, the
    sensitivity analyses and the exported files' records."""

    float_metrics: dict[str, float] = field(default_factory=dict)
    quantization: Sequence[QuantizationResult] = ()
    sensitivity: Sequence[SensitivityAnalysis] = ()
    records: Sequence[ArtifactRecord] = ()


def report_stage(
    model: nn.Module,
    data: StageData,
    config: ReportConfig,
    produced: Produced,
    dense_model: nn.Module | None = None,
    context: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ReportOutcome:
    """Measure ``model``, the dense model and every variant and file the earlier stages ``produced``, and write the
    report; ``progress`` gets a step per measurement, the operator profile and the written report."""
    progress = progress or Progress.silent()
    steps = 1 + (config.batch is not None) + (config.profile is not None) + 1
    if config.memory:
        steps += sum(r.status == "ok" and r.path is not None for r in produced.records)
    outcome = ReportOutcome()
    with progress.stage("report", steps):
        _measure_and_write(outcome, model, data, config, produced, dense_model, context or {}, progress)
    return outcome


def _measure_and_write(
    outcome: ReportOutcome,
    model: nn.Module,
    data: StageData,
    config: ReportConfig,
    produced: Produced,
    dense_model: nn.Module | None,
    context: dict[str, Any],
    progress: Progress,
) -> None:
    model = cpu_float_copy(model)
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
        for r in produced.quantization
        if r.quantized is not None
    ]
    float_metrics = produced.float_metrics or {k: v / 100 for k, v in evaluate(model, val).items()}
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
        dense = cpu_float_copy(dense_model).requires_grad_(False)
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
        outcome.points = measure_tradeoffs(
            eager,
            produced.records,
            example,
            networks=networks,
            files_network=network,
            progress=progress,
            **config.measure_options(),
        )
        profile, profile_of = _profile(outcome, config, example, eager)
        if config.profile is not None:
            progress.step("operator profile", profile_of or "none")
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
    report_meta.update({k: context[k] for k in CONTEXT_KEYS if context.get(k)})
    half = [r.name for r in produced.records if r.extra.get("attention") == "fp16"]
    if half:
        report_meta["attention"] = (
            f"{', '.join(half)} compute their attention products in fp16 where the CPU has fp16 arithmetic, in fp32 "
            "elsewhere (the accuracy of the eager model with fp16 attention is in the manifest: extra.attention_eager)"
        )
    if outcome.profile_error:
        report_meta["operator_profile_error"] = outcome.profile_error
    outcome.files = write_report(
        outcome.points, config.output_dir, report_meta, profile, profile_of, sensitivity=list(produced.sensitivity)
    )
    progress.step("report files", str(config.output_dir))


def _profile(
    outcome: ReportOutcome, config: ReportConfig, example: torch.Tensor, eager: list[EagerVariant]
) -> tuple[list, str | None]:
    """The operator profile the report shows: of the fastest verified file, or of the variant named."""
    if config.profile is None:
        return [], None
    measured = [p for p in outcome.points if p.latency is not None and p.status == "ok"]
    if config.profile == "fastest":
        files = [p for p in measured if p.path]
        chosen = min(files or measured, key=lambda p: p.latency_ms, default=None)
    else:
        chosen = next((p for p in measured if p.name == config.profile), None)
        if chosen is None:
            names = ", ".join(p.name for p in measured)
            outcome.warnings.append(f"profile={config.profile!r} is not a measured variant; these are: {names}")
            return [], None
    if chosen is None:
        return [], None
    target: Any = chosen.path if chosen.path else next(v.module for v in eager if v.name == chosen.name)
    takes_engine = chosen.runtime in format_names() and get_format(chosen.runtime).takes_engine
    engine = chosen.backend if takes_engine and chosen.precision.startswith("int8") else None
    try:
        ops = operator_profile(target, chosen.runtime, example, config.profile_top, config.threads, engine=engine)
    except Exception as err:  # a profiler that fails leaves the rest of the report intact
        outcome.profile_error = f"operator profile of {chosen.name} failed: {error_summary(err)}"
        return [], None
    return ops, f"{chosen.name} ({chosen.runtime}, {config.threads} thread(s))"
