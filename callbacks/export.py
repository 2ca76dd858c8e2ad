"""``MobileExport``: export the trained model and its quantized variants at the end of a fit, verified."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from pqv_lightning.callbacks._utils import resolve_output_dir, timm_model_of
from pqv_lightning.callbacks.quantization import (
    CALIBRATION_SPLITS,
    Quantization,
    QuantizationResult,
    check_validation_data,
    collect_batches,
    data_loader,
)
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.export import (
    EXECUTORCH_PRECISIONS,
    ONNX_PRECISIONS,
    ArtifactRecord,
    export_artifacts,
    validate_formats,
    validate_precisions,
    write_manifest,
)
from pqv_lightning.quantization import QuantizedModel

__all__ = [
    "MANIFEST_NAME",
    "MobileExport",
    "artifacts_table",
    "export_and_report",
    "needs_calibration",
    "validate_precisions",  # re-exported from pqv_lightning.export
]

MANIFEST_NAME = "manifest.json"


def needs_calibration(formats: Sequence[str], executorch: Sequence[str], onnx: Sequence[str]) -> bool:
    """Whether these formats and precisions calibrate on images (ExecuTorch static int8, ONNX QDQ)."""
    return ("executorch" in formats and "int8" in executorch) or ("onnx" in formats and "int8_qdq" in onnx)


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


def export_and_report(
    model: nn.Module,
    out_dir: str | os.PathLike,
    formats: Sequence[str],
    val_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    quantized: Sequence[QuantizedModel] = (),
    calibration: Sequence[torch.Tensor] | None = None,
    executorch_precisions: Sequence[str] = ("fp32", "int8", "int4"),
    onnx_precisions: Sequence[str] = ("fp32", "int8"),
    batch_size: int = 1,
    meta: dict[str, Any] | None = None,
    prefix: str = "model_",
) -> tuple[list[ArtifactRecord], Path, str | None]:
    """Export a CPU copy of ``model`` (and ``quantized``), verify every file, and write the manifest.

    Never raises for a failure of the export itself: per-artifact failures are in the records, and a failure
    of the whole call is returned as the third value (and written to the manifest's ``meta.error``).
    Returns the records, the manifest path and that error (``None`` when the export ran).
    """
    out = Path(out_dir)
    manifest = out / MANIFEST_NAME
    float_model = copy.deepcopy(model).cpu().float().eval()
    example = val_batches[0][0][:batch_size]
    if example.shape[0] < batch_size:
        example = torch.cat([example, example[-1:].expand(batch_size - example.shape[0], *example.shape[1:])])
    meta = dict(meta or {})
    meta.update(
        formats=list(formats),
        executorch_precisions=list(executorch_precisions),
        onnx_precisions=list(onnx_precisions),
        batch_size=batch_size,
        verified_on_images=sum(int(labels.shape[0]) for _, labels in val_batches),
        quantized_variants=[q.target.name for q in quantized],
        parameters=sum(p.numel() for p in float_model.parameters()),
        pruned=current_structure(model) is not None,
    )
    error = None
    records: list[ArtifactRecord] = []
    start = time.perf_counter()
    try:
        records = export_artifacts(
            float_model,
            out,
            formats,
            example.contiguous(),
            val_batches,
            quantized=quantized,
            calibration=calibration,
            executorch_precisions=executorch_precisions,
            onnx_precisions=onnx_precisions,
            prefix=prefix,
        )
    except Exception as err:  # the fit is over: report the failure, never lose the trained model to it
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        error = f"{type(err).__name__}: {' | '.join(lines[:3])[:500]}"
        meta["error"] = error
    meta["export_seconds"] = round(time.perf_counter() - start, 2)
    try:
        write_manifest(records, manifest, meta)
    except OSError as err:
        error = (error + "; " if error else "") + f"manifest not written: {type(err).__name__}: {err}"
    return records, manifest, error


def _results_meta(float_metrics: dict[str, float], results: Sequence[QuantizationResult]) -> dict[str, Any]:
    variants = {}
    for r in results:
        variants[r.name] = {"target": str(r.target), **r.metrics()} if r.error is None else {"error": r.error}
    return {"float": dict(float_metrics), "variants": variants}


class MobileExport(Callback):
    """Export the trained model, and each variant of the :class:`Quantization` callbacks, at the end of ``fit``.

    Formats: TorchScript ``.pt``, lite interpreter ``.ptl``, ExecuTorch ``.pte`` (XNNPACK) and ONNX. Every file
    is loaded back in its own runtime and compared with the eager float model on real validation images from
    the datamodule's validation loader; a ``manifest.json`` next to the files lists each artifact with its
    status, parity figures (top-1 agreement, max |logit difference|) and accuracy, plus the quantization
    results. A failed artifact is recorded and logged, never raised: the fit's result is kept.

    Runs on global rank 0 (other ranks wait at a barrier), after every ``Quantization`` callback of the trainer
    whatever the order of the callback list, on a CPU copy of the model: the training model and the training
    checkpoints are never touched. The output folder and the formats are checked in ``setup``, before training.

    TorchScript and lite take the float model and the torch.ao / fp16 variants; ExecuTorch and ONNX quantize the
    float model themselves to ``executorch_precisions`` / ``onnx_precisions``.

    Args:
        formats: any of ``"torchscript"``, ``"lite"``, ``"executorch"``, ``"onnx"``.
        output_dir: where the files go; default ``<trainer.log_dir>/artifacts``.
        executorch_precisions: ``"fp32"``, ``"int8"`` (static, calibrated), ``"int8_dynamic"``, ``"int4"``.
        onnx_precisions: ``"fp32"``, ``"int8"`` (onnxruntime dynamic), ``"int8_qdq"`` (static, calibrated).
        val_batches: validation batches every artifact is verified on (``None``: all).
        batch_size: the fixed batch size the files are exported for.
        calibration_batches: batches of ``calibration_split`` for the calibrated precisions.
        calibration_split: ``"train"`` or ``"val"``.
        model_attribute: attribute of the LightningModule holding the timm model.
        prefix: file name prefix (``<prefix><variant>.<ext>``).
    """

    def __init__(
        self,
        formats: Sequence[str] = ("torchscript", "lite", "executorch", "onnx"),
        output_dir: str | os.PathLike | None = None,
        executorch_precisions: Sequence[str] = ("fp32", "int8", "int4"),
        onnx_precisions: Sequence[str] = ("fp32", "int8"),
        val_batches: int | None = None,
        batch_size: int = 1,
        calibration_batches: int = 8,
        calibration_split: str = "train",
        model_attribute: str = "model",
        prefix: str = "model_",
    ) -> None:
        super().__init__()
        self.formats = validate_formats(formats)
        self.executorch_precisions = validate_precisions(executorch_precisions, EXECUTORCH_PRECISIONS, "executorch")
        self.onnx_precisions = validate_precisions(onnx_precisions, ONNX_PRECISIONS, "onnx")
        for name, value in (("val_batches", val_batches), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if batch_size is None:
            raise ValueError("batch_size must be an integer >= 1, got None.")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise ValueError(f"calibration_batches must be an integer >= 0, got {calibration_batches!r}.")
        if calibration_batches == 0 and needs_calibration(
            self.formats, self.executorch_precisions, self.onnx_precisions
        ):
            raise ValueError(
                "calibration_batches=0, but executorch 'int8' / onnx 'int8_qdq' calibrate on data: set "
                "calibration_batches >= 1 or drop those precisions."
            )
        if calibration_split not in CALIBRATION_SPLITS:
            raise ValueError(
                f"calibration_split={calibration_split!r} is invalid; accepted: {', '.join(CALIBRATION_SPLITS)}."
            )
        if not isinstance(prefix, str) or os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise ValueError(f"prefix must be a file name prefix without path separators, got {prefix!r}.")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.val_batches = val_batches
        self.batch_size = batch_size
        self.calibration_batches = calibration_batches
        self.calibration_split = calibration_split
        self.model_attribute = model_attribute
        self.prefix = prefix
        self.records: list[ArtifactRecord] = []
        self.manifest_path: Path | None = None
        self.error: str | None = None
        self._resolved_dir: Path | None = None
        self._done = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        if stage != "fit":
            return
        check_validation_data(trainer, type(self).__name__)
        self._resolved_dir = resolve_output_dir(trainer, self.output_dir, "artifacts")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records, self.manifest_path, self.error, self._done = [], None, None, False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if trainer.is_global_zero:
                self.run(trainer, pl_module)
        finally:
            trainer.strategy.barrier("pqv_mobile_export")

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArtifactRecord]:
        """Run the trainer's Quantization callbacks (once), export, verify, write the manifest; rank 0 only.

        Runs once per fit (a :class:`TradeoffReport` listed earlier may call it first); later calls return
        the same records."""
        if self._done:
            return self.records
        self._done = True
        model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        quantized: dict[str, QuantizedModel] = {}
        quantization: dict[str, Any] = {}
        for callback in trainer.callbacks:
            if isinstance(callback, Quantization):
                try:
                    callback.run(trainer, pl_module)
                except Exception as err:
                    rank_zero_warn(f"MobileExport: quantization failed, exporting without its variants: {err}")
                quantized.update({q.target.name: q for q in callback.quantized_models})
                quantization.update(_results_meta(callback.float_metrics, callback.results))
        out_dir = self._resolved_dir or Path(trainer.default_root_dir) / "artifacts"
        meta = {
            "model": type(model).__name__,
            "lightning_module": type(pl_module).__name__,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "quantization": quantization,
        }
        try:
            val = collect_batches(data_loader(trainer, "val"), self.val_batches, "validation")
            calibration = None
            if self.calibration_batches and needs_calibration(
                self.formats, self.executorch_precisions, self.onnx_precisions
            ):
                loader = data_loader(trainer, self.calibration_split)
                calibration = [x for x, _ in collect_batches(loader, self.calibration_batches, "calibration")]
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            rank_zero_warn(f"MobileExport: nothing exported, the data could not be read: {self.error}")
            return []
        self.records, self.manifest_path, self.error = export_and_report(
            model,
            out_dir,
            self.formats,
            val,
            quantized=list(quantized.values()),
            calibration=calibration,
            executorch_precisions=self.executorch_precisions,
            onnx_precisions=self.onnx_precisions,
            batch_size=self.batch_size,
            meta=meta,
            prefix=self.prefix,
        )
        self._report(trainer)
        return self.records

    def _report(self, trainer: pl.Trainer) -> None:
        if self.error is not None:
            rank_zero_warn(f"MobileExport: export failed: {self.error} (see {self.manifest_path})")
            return
        table = artifacts_table(self.records)
        counts = {status: sum(r.status == status for r in self.records) for status in ("ok", "failed", "skipped")}
        rank_zero_info(
            f"MobileExport: {counts['ok']} verified, {counts['failed']} failed, {counts['skipped']} skipped; "
            f"manifest {self.manifest_path}\n{table}"
        )
        failed = [f"{r.name} ({r.reason})" for r in self.records if r.status == "failed"]
        if failed:
            rank_zero_warn(f"MobileExport: {len(failed)} artifact(s) failed: {'; '.join(failed)}")
        metrics: dict[str, float] = {f"export/{status}": float(n) for status, n in counts.items()}
        for r in self.records:
            if r.status == "ok":
                metrics[f"export/{r.name}/top1_agreement"] = float(r.top1_agreement)
                metrics[f"export/{r.name}/size_bytes"] = float(r.size_bytes)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("export/artifacts", table, global_step=trainer.global_step)
