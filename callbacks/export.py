"""``MobileExport``: export the trained model and its quantized variants at the end of a fit, verified."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pqv_lightning.callbacks.fit_end import FitEndCallback
from pqv_lightning.export import ArtifactRecord
from pqv_lightning.pipeline import ExportConfig, PipelineResult, artifacts_table

__all__ = ["MobileExport"]


class MobileExport(FitEndCallback, config=ExportConfig, stage="export"):
    """Export the trained model, and each variant of the :class:`Quantization` callback, at the end of ``fit``.

    Formats: TorchScript ``.pt``, lite interpreter ``.ptl``, ExecuTorch ``.pte`` (XNNPACK), ONNX and, asked for by
    name, ``"aoti"``: an AOTInductor ``.pt2`` package compiled for this x86 CPU (oneDNN kernels, ``aoti_precisions``
    ``fp32`` / ``int8``; the fastest file on an x86 machine, see the README). Every file
    is loaded back in its own runtime and compared with the eager float model on real validation images from
    the datamodule's validation loader; a ``manifest.json`` next to the files lists each artifact with its
    status, parity figures (top-1 agreement, max |logit difference|) and accuracy, plus the quantization
    results. A failed artifact is recorded and logged, never raised: the fit's result is kept.

    Runs on global rank 0 (other ranks wait at a barrier), after :class:`Quantization` whatever the order of the
    callback list, on a CPU copy of the model: the training model and the training checkpoints are never touched.
    The output folder and the formats are checked in ``setup``, before training.

    TorchScript and lite take the float model and the torch.ao / fp16 variants; ExecuTorch and ONNX quantize the
    float model themselves to ``executorch_precisions`` / ``onnx_precisions``, keeping ``float_layers`` (or the
    float layers the matching :class:`Quantization` target chose) in float. A :class:`QuantizationAwareTraining`
    variant gets its own ``.pte``, verified against the variant. ``executorch_attention="fp16"`` runs the attention
    products of every ``.pte`` in fp16 (native on phones with fp16 arithmetic; the manifest records how the float
    model with fp16 attention agrees with the float model).

    ``output_dir`` defaults to ``<trainer.log_dir>/artifacts``.
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
        on_failure: str = "raise",
        weights: str | None = None,
        float_layers: Sequence[str] = (),
        aoti_precisions: Sequence[str] = ("fp32", "int8"),
        executorch_attention: str = "fp32",
    ) -> None:
        config = ExportConfig(
            formats, output_dir, executorch_precisions, onnx_precisions, val_batches, batch_size,
            calibration_batches, calibration_split, prefix, tuple(float_layers), tuple(aoti_precisions),
            executorch_attention,
        )  # fmt: skip
        super().__init__(config, model_attribute, on_failure, weights)

    @property
    def records(self) -> list[ArtifactRecord]:
        """One record per artifact (verified, failed or skipped), once the chain ran."""
        return self.result.export.records if self.result is not None else []

    @property
    def manifest_path(self) -> Path | None:
        return self.result.export.manifest if self.result is not None else None

    @property
    def error(self) -> str | None:
        """Why the export as a whole failed (``None`` when it ran; per-file failures are in the records)."""
        return self.result.export.error if self.result is not None else None

    @override
    def outputs(self) -> list[ArtifactRecord]:
        return self.records

    @override
    def log_result(self, trainer: pl.Trainer, result: PipelineResult) -> None:
        outcome = result.export
        if outcome.error is not None:
            rank_zero_warn(f"MobileExport: export failed: {outcome.error} (see {outcome.manifest})")
            return
        table = artifacts_table(outcome.records)
        counts = {status: sum(r.status == status for r in outcome.records) for status in ("ok", "failed", "skipped")}
        rank_zero_info(
            f"MobileExport: {counts['ok']} verified, {counts['failed']} failed, {counts['skipped']} skipped; "
            f"manifest {outcome.manifest}\n{table}"
        )
        failed = [f"{r.name} ({r.reason})" for r in outcome.records if r.status == "failed"]
        if failed:
            rank_zero_warn(f"MobileExport: {len(failed)} artifact(s) failed: {'; '.join(failed)}")
        metrics: dict[str, float] = {f"export/{status}": float(n) for status, n in counts.items()}
        for r in outcome.records:
            if r.status == "ok":
                metrics[f"export/{r.name}/top1_agreement"] = float(r.top1_agreement)
                metrics[f"export/{r.name}/size_bytes"] = float(r.size_bytes)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("export/artifacts", table, global_step=trainer.global_step)
