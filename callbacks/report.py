"""``TradeoffReport``: measure every variant of the trained model at fit end and report the trade-off."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pqv_lightning.callbacks.fit_end import FitEndCallback
from pqv_lightning.pipeline import PipelineResult, ReportConfig
from pqv_lightning.report import TradeoffPoint

__all__ = ["TradeoffReport"]


class TradeoffReport(FitEndCallback, config=ReportConfig, stage="report"):
    """At the end of ``fit``, measure the latency, memory and accuracy of every variant and write a report.

    Variants: the trained float model (eager), the dense model it was pruned from (when a shape-changing callback,
    :class:`StructuredPruning` or :class:`SparsityGates`, changed it during this fit), every variant of the
    trainer's :class:`Quantization` callback (eager) and every file :class:`MobileExport` verified, each run in its
    own runtime. Those callbacks run first, whatever the order of the callback list.

    Output, in ``output_dir`` (default ``<log dir>/report``): ``report.md`` (table, Pareto choices in bold,
    per-operator profile), ``report.json`` (every figure), PNG plots (accuracy vs latency with the Pareto front,
    size vs accuracy, latency per runtime/backend, operator profile). To every logger: scalars
    ``tradeoff/<variant>/{latency_ms,top1,size_mib,peak_rss_mib}``, hyper-parameters with the headline metrics;
    to TensorBoard also the Markdown as text and the plots as images.

    Runs on global rank 0 (other ranks wait at a barrier) on CPU copies; never raises at fit end: a failed
    measurement is logged as a warning and the fit's result stays.

    ``output_dir`` defaults to ``<trainer.log_dir>/report``.

    Raises:
        InvalidArgumentError: at construction, a value out of range (threads, runs, batch, profile).
        FitEndIncompleteError: at fit end, after everything was saved, when nothing could be measured (with
            ``on_failure="raise"``, the default).

    Example::

        trainer = Trainer(callbacks=[Quantization(), MobileExport(), TradeoffReport(threads=2, batch=None)])
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        threads: int = 1,
        warmup: int = 10,
        runs: int = 50,
        batch: int | None = 16,
        memory: bool = True,
        profile: str | None = "fastest",
        profile_top: int = 15,
        include_dense: bool = True,
        val_batches: int | None = None,
        model_attribute: str = "model",
        on_failure: str = "raise",
        weights: str | None = None,
    ) -> None:
        config = ReportConfig(
            output_dir=output_dir,
            threads=threads,
            warmup=warmup,
            runs=runs,
            batch=batch,
            memory=memory,
            profile=profile,
            profile_top=profile_top,
            include_dense=include_dense,
            val_batches=val_batches,
        )
        super().__init__(config, model_attribute, on_failure, weights)

    @property
    def points(self) -> list[TradeoffPoint]:
        """One measured point per variant (the report's rows), once the chain ran."""
        return self.result.points if self.result is not None else []

    @property
    def files(self) -> dict[str, Path]:
        """The written report files by name (``markdown``, ``json`` and one per plot)."""
        return self.result.report_files if self.result is not None else {}

    @property
    def error(self) -> str | None:
        """Why the report, or its operator profile, could not be made (``None`` when all went well)."""
        if self.result is None:
            return None
        return self.result.report_error or self.result.profile_error

    @override
    def outputs(self) -> list[TradeoffPoint]:
        return self.points

    @override
    def log_result(self, trainer: pl.Trainer, result: PipelineResult) -> None:
        for warning in result.warnings:
            rank_zero_warn(f"TradeoffReport: {warning}")
        if result.profile_error is not None:
            rank_zero_warn(f"TradeoffReport: {result.profile_error}")
        if result.report_error is not None:
            rank_zero_warn(f"TradeoffReport: no report: {result.report_error}")
            return
        metrics: dict[str, float] = {}
        for p in self.points:
            key = f"tradeoff/{p.name.replace(' ', '_')}"
            values = {
                "latency_ms": p.latency_ms,
                "top1": p.top1,
                "size_mib": None if p.size_bytes is None else p.size_bytes / 2**20,
                "peak_rss_mib": None if p.peak_rss_bytes is None else p.peak_rss_bytes / 2**20,
            }
            metrics.update({f"{key}/{k}": float(v) for k, v in values.items() if v is not None})
        headline = self._headline()
        text = self.files["markdown"].read_text()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.log_hyperparams(
                {"tradeoff_threads": self.config.threads, "tradeoff_batch": self.config.batch or 1}, headline
            )
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("tradeoff/report", text, global_step=trainer.global_step)
            if hasattr(experiment, "add_image"):
                import matplotlib.image

                for name, path in self.files.items():
                    if path.suffix == ".png":
                        image = matplotlib.image.imread(path)[..., :3]
                        experiment.add_image(f"tradeoff/{name}", image, trainer.global_step, dataformats="HWC")
        front = [p for p in self.points if p.pareto]
        choices = ", ".join(f"{p.name} ({p.latency_ms:.3f} ms, {p.top1 * 100:.2f}%)" for p in front)
        rank_zero_info(
            f"TradeoffReport: {len(self.points)} variants measured at {self.config.threads} thread(s); Pareto front: "
            f"{choices}; report {self.files['markdown']}"
        )

    def _headline(self) -> dict[str, float]:
        """The few numbers worth comparing across runs (TensorBoard's HPARAMS view)."""
        ok = [p for p in self.points if p.latency_ms is not None]
        files = [p for p in ok if p.path and p.status == "ok"]
        out: dict[str, float] = {}
        eager = next((p for p in ok if p.runtime == "eager" and p.precision == "fp32" and p.network != "dense"), None)
        if eager is not None:
            out["tradeoff/float_eager_ms"] = eager.latency_ms
            if eager.top1 is not None:
                out["tradeoff/float_top1"] = eager.top1
        if files:
            fastest = min(files, key=lambda p: p.latency_ms)
            out["tradeoff/fastest_file_ms"] = fastest.latency_ms
            if fastest.top1 is not None:
                out["tradeoff/fastest_file_top1"] = fastest.top1
            if eager is not None:
                out["tradeoff/fastest_file_speedup"] = eager.latency_ms / fastest.latency_ms
        out["tradeoff/pareto_variants"] = float(sum(p.pareto for p in self.points))
        return out
