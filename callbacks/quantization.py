"""``Quantization``: post-training quantization of the trained (possibly pruned) model at the end of a fit."""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from pqv_lightning.callbacks._utils import first_loader, split_batch, timm_model_of, train_loader
from pqv_lightning.quantization import (
    QuantizationTarget,
    QuantizedModel,
    evaluate,
    quantize,
    supported_targets,
    top1_agreement,
)

__all__ = [
    "CALIBRATION_SPLITS",
    "Quantization",
    "QuantizationResult",
    "check_validation_data",
    "collect_batches",
    "data_loader",
    "parse_targets",
    "quantize_and_evaluate",
    "results_table",
]

CALIBRATION_SPLITS = ("train", "val")
_CALIBRATED = ("int8_static", "int8_pt2e")


@dataclass
class QuantizationResult:
    """One quantized variant and its validation figures (``top1``/``top5`` as fractions, like ``val/top1``).

    ``top1_agreement`` is the fraction of validation images on which it predicts the float model's class.
    ``quantized`` is ``None`` and ``error`` says why when quantizing or evaluating failed.
    """

    target: QuantizationTarget
    quantized: QuantizedModel | None
    top1: float | None = None
    top5: float | None = None
    top1_agreement: float | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def metrics(self) -> dict[str, float]:
        values = {"top1": self.top1, "top5": self.top5, "top1_agreement": self.top1_agreement}
        return {key: float(value) for key, value in values.items() if value is not None}


def parse_targets(targets: Sequence[str | QuantizationTarget], calibration_batches: int) -> list[QuantizationTarget]:
    """Parse and check target specs against this installation; raise naming the bad value and accepted ones."""
    if isinstance(targets, (str, QuantizationTarget)):
        targets = [targets]
    if not targets:
        raise ValueError(f"No quantization target given; accepted: {', '.join(supported_targets())}.")
    available = supported_targets()
    parsed: list[QuantizationTarget] = []
    for spec in targets:
        target = spec if isinstance(spec, QuantizationTarget) else QuantizationTarget.parse(str(spec))
        if str(target) not in available:
            raise ValueError(
                f"Quantization target {str(spec)!r} cannot be built by this installation "
                f"(torch {torch.__version__}); accepted here: {', '.join(available)}."
            )
        if target in parsed:
            raise ValueError(f"Quantization target {str(spec)!r} is listed twice.")
        parsed.append(target)
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 0:
        raise ValueError(f"calibration_batches must be an integer >= 0, got {calibration_batches!r}.")
    calibrated = [str(t) for t in parsed if t.method in _CALIBRATED]
    if calibrated and calibration_batches == 0:
        raise ValueError(
            f"calibration_batches=0, but {', '.join(calibrated)} calibrate activations on data: "
            "set calibration_batches >= 1 or use int8_dynamic / fp16 / int4_weight."
        )
    return parsed


def data_loader(trainer: pl.Trainer, split: str) -> Iterable:
    """The data loader of ``split`` ("train" or "val"): the datamodule's own, else the trainer's."""
    if split == "train":
        return train_loader(trainer)
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return first_loader(datamodule.val_dataloader())
    loaders = trainer.val_dataloaders
    if loaders is None:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        loaders = source.dataloader() if source.is_defined() else None
    if not loaders:
        raise RuntimeError(
            "No validation data: give the datamodule a val_dataloader or pass val_dataloaders to Trainer.fit."
        )
    return first_loader(loaders)


def check_validation_data(trainer: pl.Trainer, owner: str) -> None:
    """Fail before training when the fit has no validation data to evaluate and verify on."""
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return
    if trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined():
        return
    raise ValueError(
        f"{owner} evaluates on validation data, but this fit has none: give the datamodule a val_dataloader "
        "or pass val_dataloaders to Trainer.fit."
    )


def collect_batches(loader: Iterable, count: int | None, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` (all if None) ``(images, labels)`` batches of ``loader``, as float32 CPU tensors."""
    batches = []
    for batch in itertools.islice(iter(loader), count):
        images, labels = split_batch(batch)
        batches.append((images.detach().cpu().float(), labels.detach().cpu()))
    if not batches:
        raise RuntimeError(f"The {what} data loader yielded no batch.")
    return batches


def _error(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {' | '.join(lines[:3])[:500]}"


def _fractions(percent: dict[str, float]) -> dict[str, float]:
    return {key: value / 100.0 for key, value in percent.items()}


def quantize_and_evaluate(
    model: nn.Module,
    targets: Sequence[QuantizationTarget],
    val_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
) -> tuple[dict[str, float], list[QuantizationResult]]:
    """Quantize a CPU copy of ``model`` for each target; evaluate the float model and every variant.

    Returns the float model's ``{"top1", "top5"}`` (fractions) and one result per target, in order.
    A target that fails is recorded with its error and the others go on. ``model`` is never modified.
    """
    float_model = copy.deepcopy(model).cpu().float().eval()
    float_metrics = _fractions(evaluate(float_model, val_batches))
    example = val_batches[0][0]
    results = []
    for target in targets:
        start = time.perf_counter()
        try:
            quantized = quantize(float_model, target, example, calibration)
            metrics = _fractions(evaluate(quantized.module, val_batches))
            agreement = top1_agreement(float_model, quantized.module, val_batches)
        except Exception as err:  # one bad variant must not lose the others at the end of a long fit
            results.append(QuantizationResult(target, None, seconds=time.perf_counter() - start, error=_error(err)))
            continue
        results.append(
            QuantizationResult(
                target,
                quantized,
                top1=metrics["top1"],
                top5=metrics["top5"],
                top1_agreement=agreement,
                seconds=time.perf_counter() - start,
            )
        )
    return float_metrics, results


def results_table(float_metrics: dict[str, float], results: Sequence[QuantizationResult]) -> str:
    """A Markdown table of the float model and every variant side by side (console and TensorBoard)."""
    rows = [
        "| variant | top-1 % | top-5 % | Δ top-1 | agreement | time s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| float | {100 * float_metrics['top1']:.2f} | {100 * float_metrics['top5']:.2f} | | | |",
    ]
    for r in results:
        if r.error is not None:
            rows.append(f"| {r.name} | failed: {r.error} | | | | |")
            continue
        rows.append(
            f"| {r.name} | {100 * r.top1:.2f} | {100 * r.top5:.2f} | {100 * (r.top1 - float_metrics['top1']):+.2f} "
            f"| {r.top1_agreement:.4f} | {r.seconds:.1f} |"
        )
    return "\n".join(rows)


class Quantization(Callback):
    """Post-training quantization at the end of ``fit``, with the float model and every variant evaluated.

    Runs on global rank 0 (the other ranks wait at a barrier) on a CPU copy of the trained, possibly pruned,
    model: the training model, its optimizer state and every checkpoint stay as they are. Each variant and the
    float model are evaluated on the validation data (top-1, top-5, agreement with the float model) and logged
    side by side: logger metrics ``quantization/<variant>/top1`` (``float`` for the float model), a console
    table, and a TensorBoard text table. ``results`` keeps the quantized models for :class:`MobileExport`,
    which runs this callback first, whatever their order in ``Trainer(callbacks=...)``.

    Works on any LightningModule that exposes its timm model as ``model`` (or ``model_attribute``).

    Args:
        targets: ``"method[:backend]"`` specs, e.g. ``"int8_dynamic:x86"``, ``"int8_static:qnnpack"``,
            ``"int8_pt2e:xnnpack"``, ``"fp16"``, ``"int4_weight"`` (see ``supported_targets()``).
        calibration_batches: batches of ``calibration_split`` that calibrate activation ranges
            (``int8_static``, ``int8_pt2e``).
        calibration_split: ``"train"`` or ``"val"``.
        eval_batches: validation batches to evaluate on (``None``: all).
        model_attribute: attribute of the LightningModule holding the timm model.
    """

    def __init__(
        self,
        targets: Sequence[str] = ("int8_dynamic:x86",),
        calibration_batches: int = 8,
        calibration_split: str = "train",
        eval_batches: int | None = None,
        model_attribute: str = "model",
    ) -> None:
        super().__init__()
        self.targets = parse_targets(targets, calibration_batches)
        if calibration_split not in CALIBRATION_SPLITS:
            raise ValueError(
                f"calibration_split={calibration_split!r} is invalid; accepted: {', '.join(CALIBRATION_SPLITS)}."
            )
        if eval_batches is not None and (isinstance(eval_batches, bool) or eval_batches < 1):
            raise ValueError(f"eval_batches must be None (all) or >= 1, got {eval_batches!r}.")
        self.calibration_batches = calibration_batches
        self.calibration_split = calibration_split
        self.eval_batches = eval_batches
        self.model_attribute = model_attribute
        self.float_metrics: dict[str, float] = {}
        self.results: list[QuantizationResult] = []
        self._done = False

    @property
    def quantized_models(self) -> list[QuantizedModel]:
        """The variants that were built and evaluated successfully."""
        return [r.quantized for r in self.results if r.quantized is not None]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        if stage == "fit":
            check_validation_data(trainer, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.float_metrics, self.results, self._done = {}, [], False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if trainer.is_global_zero:
                self.run(trainer, pl_module)
        finally:
            trainer.strategy.barrier("pqv_quantization")

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[QuantizationResult]:
        """Quantize and evaluate once per fit (later calls return the same results); rank 0 only."""
        if self._done:
            return self.results
        self._done = True
        model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        val_batches = collect_batches(data_loader(trainer, "val"), self.eval_batches, "validation")
        calibration = None
        if self.calibration_batches and any(t.method in _CALIBRATED for t in self.targets):
            loader = data_loader(trainer, self.calibration_split)
            calibration = collect_batches(loader, self.calibration_batches, self.calibration_split)
        self.float_metrics, self.results = quantize_and_evaluate(model, self.targets, val_batches, calibration)
        self._report(trainer)
        return self.results

    def _report(self, trainer: pl.Trainer) -> None:
        table = results_table(self.float_metrics, self.results)
        images = "all" if self.eval_batches is None else f"{self.eval_batches} batches of"
        rank_zero_info(f"Quantization: accuracy on {images} the validation data\n{table}")
        for r in self.results:
            if r.error is not None:
                rank_zero_warn(f"Quantization: target {r.target} failed: {r.error}")
        metrics = {f"quantization/float/{key}": float(value) for key, value in self.float_metrics.items()}
        for r in self.results:
            metrics.update({f"quantization/{r.name}/{key}": value for key, value in r.metrics().items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("quantization/results", table, global_step=trainer.global_step)
