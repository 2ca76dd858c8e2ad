"""``Quantization``: post-training quantization of the trained (possibly pruned) model at the end of a fit."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pqv_lightning.callbacks.fit_end import FitEndCallback
from pqv_lightning.pipeline import PipelineResult, QuantizationConfig
from pqv_lightning.quantization import QuantizationResult, QuantizedModel, results_table
from pqv_lightning.report import plot_sensitivity, sensitivity_table

__all__ = ["Quantization"]


class Quantization(FitEndCallback, config=QuantizationConfig, stage="quantization"):
    """Post-training quantization at the end of ``fit``, with the float model and every variant evaluated.

    Runs on global rank 0 (the other ranks wait at a barrier) on a CPU copy of the trained, possibly pruned,
    model: the training model, its optimizer state and every checkpoint stay as they are. Each variant and the
    float model are evaluated on the validation data (top-1, top-5, agreement with the float model) and logged
    side by side: logger metrics ``quantization/<variant>/top1`` (``float`` for the float model), a console
    table, and a TensorBoard text table. The variants go on to :class:`MobileExport` and :class:`TradeoffReport`:
    the three run as one chain (quantize, export, report) whatever their order in ``Trainer(callbacks=...)``.

    Mixed precision: ``float_layers`` keeps layers in float, ``max_float_layers`` / ``max_drop`` choose them by
    budget from a per-layer sensitivity analysis (checked against the model in ``setup``); ``sensitivity``
    measures and reports the analysis for more targets (console, TensorBoard text and figure, the report). A
    :class:`QuantizationAwareTraining` variant is evaluated here beside the post-training ones.

    ``smoothing=True`` moves activation outliers into the weights before anything is quantized (exact in float; the
    strength chosen per layer on the calibration batches, see :func:`pqv_lightning.quantization.smooth_outliers`):
    the variants and every file :class:`MobileExport` writes are built from the smoothed model, and the manifest
    and report say which layers were smoothed. It keeps every layer integer, where float layers give up speed.
    ``rounding="gptq"`` rounds the linear weights of the variants by GPTQ and ``bias_correction=True`` corrects their
    biases (:func:`pqv_lightning.quantization.round_weights`; on the calibration batches). With a ``max_drop``
    budget, ``integer_first=True`` takes the cheapest of plain, smoothing, smoothing + GPTQ + bias correction that
    keeps every layer integer within the budget, and chooses float layers only when none does.

    Works on any LightningModule that exposes its timm model as ``model`` (or ``model_attribute``).

    Raises:
        InvalidArgumentError: at construction, a target this installation cannot build or a bad value; in ``setup``,
            float layers that match no layer of the model or a budget the model cannot meet.
        FitEndIncompleteError: at fit end, after everything was saved, when no variant could be built (with
            ``on_failure="raise"``, the default).

    Example::

        trainer = Trainer(callbacks=[Quantization(targets=["int8_pt2e:xnnpack", "int4_weight"], max_drop=0.5)])
    """

    def __init__(
        self,
        targets: Sequence[str] = ("int8_dynamic:x86",),
        calibration_batches: int = 8,
        calibration_split: str = "train",
        eval_batches: int | None = None,
        model_attribute: str = "model",
        on_failure: str = "raise",
        weights: str | None = None,
        float_layers: Sequence[str] = (),
        max_float_layers: int | None = None,
        max_drop: float | None = None,
        sensitivity: Sequence[str] = (),
        granularity: str = "layer",
        smoothing: bool = False,
        rounding: str = "nearest",
        bias_correction: bool = False,
        integer_first: bool = False,
    ) -> None:
        config = QuantizationConfig(
            targets=tuple(targets),
            calibration_batches=calibration_batches,
            calibration_split=calibration_split,
            eval_batches=eval_batches,
            float_layers=tuple(float_layers),
            max_float_layers=max_float_layers,
            max_drop=max_drop,
            sensitivity=tuple(sensitivity),
            granularity=granularity,
            smoothing=smoothing,
            rounding=rounding,
            bias_correction=bias_correction,
            integer_first=integer_first,
        )
        super().__init__(config, model_attribute, on_failure, weights)

    @property
    def float_metrics(self) -> dict[str, float]:
        """The float model's validation ``top1`` / ``top5`` (fractions), once the chain ran."""
        return self.result.float_metrics if self.result is not None else {}

    @property
    def results(self) -> list[QuantizationResult]:
        """One result per target, in order (a failed target holds its error)."""
        return self.result.quantization if self.result is not None else []

    @property
    def quantized_models(self) -> list[QuantizedModel]:
        """The variants that were built and evaluated successfully."""
        return [r.quantized for r in self.results if r.quantized is not None]

    @override
    def outputs(self) -> list[QuantizationResult]:
        return self.results

    @override
    def log_result(self, trainer: pl.Trainer, result: PipelineResult) -> None:
        if result.quantization_error is not None:
            rank_zero_warn(f"Quantization: no variant built: {result.quantization_error}")
            return
        table = results_table(result.float_metrics, result.quantization)
        images = "all" if self.config.eval_batches is None else f"{self.config.eval_batches} batches of"
        if result.recipe is not None:
            rank_zero_info(f"Quantization: recipe taken (integer_first): {result.recipe}")
        if result.smoothing is not None:
            rank_zero_info(f"Quantization: smoothing: {result.smoothing.summary()}")
        rank_zero_info(f"Quantization: accuracy on {images} the validation data\n{table}")
        for r in result.quantization:
            if r.error is not None:
                rank_zero_warn(f"Quantization: target {r.target} failed: {r.error}")
        metrics = {f"quantization/float/{key}": float(value) for key, value in result.float_metrics.items()}
        for r in result.quantization:
            metrics.update({f"quantization/{r.name}/{key}": value for key, value in r.metrics().items()})
        for r in result.quantization:
            if r.quantized is not None:
                metrics[f"quantization/{r.name}/float_layers"] = float(len(r.float_layers))
        tables = {f"quantization/sensitivity/{a.key}": a for a in result.sensitivity}
        for analysis in tables.values():
            rank_zero_info(f"Quantization: {sensitivity_table(analysis)}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("quantization/results", table, global_step=trainer.global_step)
                for tag, analysis in tables.items():
                    experiment.add_text(tag, sensitivity_table(analysis), global_step=trainer.global_step)
            if hasattr(experiment, "add_figure"):
                for tag, analysis in tables.items():
                    experiment.add_figure(tag, plot_sensitivity(analysis), global_step=trainer.global_step)
