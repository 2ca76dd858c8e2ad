"""``TradeoffReport``: measure every variant of the trained model at fit end and report the trade-off."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from pqv_lightning.callbacks._utils import resolve_output_dir, timm_model_of
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.export import MobileExport
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.quantization import Quantization, check_validation_data, collect_batches, data_loader
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.export import ArtifactRecord
from pqv_lightning.measure import operator_profile
from pqv_lightning.quantization import evaluate, top1_agreement
from pqv_lightning.report import EagerVariant, TradeoffPoint, measure_tradeoffs, write_report

__all__ = ["TradeoffReport"]


def _positive_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is invalid; accepted: {accepted}.")


class TradeoffReport(Callback):
    """At the end of ``fit``, measure the latency, memory and accuracy of every variant and write a report.

    Variants: the trained float model (eager), the dense model it was pruned from (when a
    :class:`StructuredPruning` callback pruned it during this fit), every variant of the trainer's
    :class:`Quantization` callbacks (eager) and every file :class:`MobileExport` verified, each run in its own
    runtime. Those callbacks run first, whatever the order of the callback list.

    Output, in ``output_dir`` (default ``<log dir>/report``): ``report.md`` (table, Pareto choices in bold,
    per-operator profile), ``report.json`` (every figure), PNG plots (accuracy vs latency with the Pareto front,
    size vs accuracy, latency per runtime/backend, operator profile). To every logger: scalars
    ``tradeoff/<variant>/{latency_ms,top1,size_mib,peak_rss_mib}``, hyper-parameters with the headline metrics;
    to TensorBoard also the Markdown as text and the plots as images.

    Runs on global rank 0 (other ranks wait at a barrier) on CPU copies; never raises at fit end: a failed
    measurement is logged as a warning and the fit's result stays.

    Args:
        output_dir: where the report goes.
        threads: threads of every runtime (fixed and stated in the report).
        warmup, runs: untimed and timed calls per variant at batch 1.
        batch: the larger batch measured too (``None``: batch 1 only).
        memory: measure each file's peak RSS in a fresh process (a few seconds per file).
        profile: per-operator profile of ``"fastest"`` (the fastest verified file), a variant name, or ``None``.
        profile_top: operators shown in the profile.
        include_dense: measure the dense model a :class:`StructuredPruning` of this fit pruned.
        val_batches: validation batches the eager variants are evaluated on (``None``: all).
        model_attribute: attribute of the LightningModule holding the timm model.
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
    ) -> None:
        super().__init__()
        _positive_int("threads", threads)
        _positive_int("warmup", warmup, minimum=0)
        _positive_int("runs", runs)
        _positive_int("batch", batch, minimum=2, allow_none=True)
        _positive_int("profile_top", profile_top)
        _positive_int("val_batches", val_batches, allow_none=True)
        if profile is not None and (not isinstance(profile, str) or not profile):
            raise ValueError(f"profile={profile!r} is invalid; accepted: 'fastest', a variant name, or None.")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.threads, self.warmup, self.runs, self.batch = threads, warmup, runs, batch
        self.memory, self.profile, self.profile_top = bool(memory), profile, profile_top
        self.include_dense, self.val_batches, self.model_attribute = bool(include_dense), val_batches, model_attribute
        self.points: list[TradeoffPoint] = []
        self.files: dict[str, Path] = {}
        self.error: str | None = None
        self._dense: nn.Module | None = None
        self._resolved_dir: Path | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        if stage != "fit":
            return
        check_validation_data(trainer, type(self).__name__)
        self._resolved_dir = resolve_output_dir(trainer, self.output_dir, "report")
        self._dense = None
        pruning = [cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning)]
        if self.include_dense and pruning and trainer.is_global_zero:
            if current_structure(model) is None:
                pruning[0].on_dense_model(self._keep_dense)
            elif pruning[0].dense_model is not None:  # pruned in its setup, which ran before this one
                self._keep_dense(pruning[0].dense_model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.points, self.files, self.error = [], {}, None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if trainer.is_global_zero:
                try:
                    self.run(trainer, pl_module)
                except Exception as err:  # the fit is over: report the failure, never lose the trained model
                    self.error = f"{type(err).__name__}: {err}"
                    rank_zero_warn(f"TradeoffReport: no report: {self.error}")
        finally:
            trainer.strategy.barrier("pqv_tradeoff_report")

    # ------------------------------------------------------------------ the work
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[TradeoffPoint]:
        """Run quantization and export (once), measure every variant, write and log the report; rank 0 only."""
        model = copy.deepcopy(timm_model_of(pl_module, self.model_attribute, type(self).__name__)).cpu().float()
        model.eval()
        val = collect_batches(data_loader(trainer, "val"), self.val_batches, "validation")
        network = "pruned" if current_structure(model) is not None else "float"

        float_metrics: dict[str, float] = {}
        eager: list[EagerVariant] = []
        quantized: list[EagerVariant] = []
        for callback in trainer.callbacks:
            if isinstance(callback, Quantization):
                callback.run(trainer, pl_module)
                float_metrics = float_metrics or dict(callback.float_metrics)
                for r in callback.results:
                    if r.quantized is not None:
                        target = r.target
                        quantized.append(
                            EagerVariant(
                                f"{target.name} eager",
                                network,
                                target.method,
                                r.quantized.module,
                                backend=target.backend or "-",
                                top1=r.top1,
                                top5=r.top5,
                                agreement=r.top1_agreement,
                            )
                        )
        records: list[ArtifactRecord] = []
        for callback in trainer.callbacks:
            if isinstance(callback, MobileExport):
                records += callback.run(trainer, pl_module)
        if not float_metrics:
            float_metrics = {k: v / 100 for k, v in evaluate(model, val).items()}
        eager.append(
            EagerVariant(
                f"{network} fp32 eager",
                network,
                "fp32",
                model,
                top1=float_metrics.get("top1"),
                top5=float_metrics.get("top5"),
                agreement=1.0,
            )
        )
        networks: dict[str, nn.Module] = {network: model}
        if self._dense is not None:
            dense = self._dense
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
            self.points = measure_tradeoffs(
                eager,
                records,
                example,
                networks=networks,
                files_network=network,
                threads=self.threads,
                warmup=self.warmup,
                runs=self.runs,
                batch=self.batch,
                memory=self.memory,
            )
            profile, profile_of = self._profile(example, eager)
        finally:
            torch.set_num_threads(previous_threads)
        meta = self._meta(trainer, model, network, val)
        if self.error:
            meta["operator_profile_error"] = self.error
        out_dir = self._resolved_dir or Path(trainer.default_root_dir) / "report"
        self.files = write_report(self.points, out_dir, meta, profile, profile_of)
        self._log(trainer, meta)
        return self.points

    def _keep_dense(self, dense: nn.Module) -> None:
        self._dense = copy.deepcopy(dense).cpu().float().eval()
        self._dense.requires_grad_(False)

    def _profile(self, example: torch.Tensor, eager: list[EagerVariant]) -> tuple[list, str | None]:
        if self.profile is None:
            return [], None
        measured = [p for p in self.points if p.latency is not None and p.status == "ok"]
        if self.profile == "fastest":
            files = [p for p in measured if p.path]
            chosen = min(files or measured, key=lambda p: p.latency_ms, default=None)
        else:
            chosen = next((p for p in measured if p.name == self.profile), None)
            if chosen is None:
                names = ", ".join(p.name for p in measured)
                rank_zero_warn(
                    f"TradeoffReport: profile={self.profile!r} is not a measured variant; these are: {names}"
                )
                return [], None
        if chosen is None:
            return [], None
        if chosen.path:
            target: Any = chosen.path
        else:
            target = next(v.module for v in eager if v.name == chosen.name)
        engine = (
            chosen.backend
            if chosen.runtime in ("torchscript", "lite") and chosen.precision.startswith("int8")
            else None
        )
        try:
            ops = operator_profile(target, chosen.runtime, example, self.profile_top, self.threads, engine=engine)
        except Exception as err:  # a profiler that fails leaves the rest of the report intact
            self.error = f"operator profile of {chosen.name} failed: {type(err).__name__}: {err}"
            rank_zero_warn(f"TradeoffReport: {self.error}")
            return [], None
        return ops, f"{chosen.name} ({chosen.runtime}, {self.threads} thread(s))"

    def _meta(self, trainer: pl.Trainer, model: nn.Module, network: str, val: list) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "title": f"{type(model).__name__}, {network} network, epoch {trainer.current_epoch}",
            "threads": self.threads,
            "warmup": self.warmup,
            "runs": self.runs,
            "val_images": sum(int(labels.shape[0]) for _, labels in val),
            "global_step": trainer.global_step,
        }
        for callback in trainer.callbacks:
            if isinstance(callback, StructuredPruning) and callback.result is not None:
                r = callback.result
                meta["pruning"] = (
                    f"{callback.spec.importance} importance, ratio {r.ratio:g}: params {r.params_before / 1e6:.3f}M -> "
                    f"{r.params_after / 1e6:.3f}M, MACs {r.macs_before / 1e6:.1f}M -> {r.macs_after / 1e6:.1f}M"
                )
            if isinstance(callback, KnowledgeDistillation):
                meta["distillation"] = (
                    f"{callback.mode} (T={callback.temperature:g}, alpha={callback.alpha:g}) from "
                    f"{callback.teacher_source or 'the dense model'}"
                )
        return meta

    def _log(self, trainer: pl.Trainer, meta: dict[str, Any]) -> None:
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
            logger.log_hyperparams({"tradeoff_threads": self.threads, "tradeoff_batch": self.batch or 1}, headline)
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
            f"TradeoffReport: {len(self.points)} variants measured at {self.threads} thread(s); Pareto front: "
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
