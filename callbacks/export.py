"""``MobileExport``: export the trained model and its quantized variants at the end of a fit, verified."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pqv_lightning.callbacks.fit_end import FitEndCallback
from pqv_lightning.export import ArtifactRecord
from pqv_lightning.export.formats import artifacts_from_arguments, legacy_artifact_parameters
from pqv_lightning.pipeline import ExportConfig, PipelineResult, artifacts_table

__all__ = ["MobileExport"]


class MobileExport(FitEndCallback, config=ExportConfig, stage="export"):
    """Export the trained model, and each variant of the :class:`Quantization` callback, at the end of ``fit``.

    ``artifacts`` names the files, ``{format: precisions}`` (e.g. ``{"executorch": ["fp32", "int8"], "onnx":
    ["fp32", "int8"]}``); the formats are those of :mod:`pqv_lightning.export.formats` (TorchScript ``.pt``, lite
    ``.ptl``, ExecuTorch ``.pte`` for XNNPACK, ONNX, and, asked for by name, an AOTInductor ``.pt2`` package
    compiled for this x86 CPU), and ``options`` their settings (e.g. ``{"executorch": {"attention": "fp16"}}``). Every
    file is loaded back in its own runtime and compared with the eager float model on real validation images from
    the datamodule's validation loader; a ``manifest.json`` next to the files lists each artifact with its
    status, parity figures (top-1 agreement, max |logit difference|) and accuracy, plus the quantization
    results. A failed artifact is recorded and logged, never raised: the fit's result is kept.

    Runs on global rank 0 (other ranks wait at a barrier), after :class:`Quantization` whatever the order of the
    callback list, on a CPU copy of the model: the training model and the training checkpoints are never touched.
    The output folder and the files asked for are checked in ``setup``, before training.

    TorchScript and lite take the float model and the torch.ao / fp16 variants (``"quantized"``); the other formats
    quantize the float model themselves to their precisions, keeping ``float_layers`` (or the float layers the
    matching :class:`Quantization` target chose) in float. A :class:`QuantizationAwareTraining` variant gets its
    own ``.pte``, verified against the variant.

    ``output_dir`` defaults to ``<trainer.log_dir>/artifacts``. The keys of 0.1 (``formats``, ``<format>_precisions``
    such as ``executorch_precisions``, ``<format>_<option>`` such as ``executorch_attention``) still work in code and
    YAML, with a deprecation warning naming the new form.

    Raises:
        InvalidArgumentError: at construction, an unknown format, precision or option, or a combination a format
            refuses; in ``setup``, float layers or options the model cannot take.

    Example::

        trainer = Trainer(callbacks=[
            Quantization(targets=["int8_pt2e:xnnpack"]),
            MobileExport(artifacts={"executorch": ["fp32", "int8"], "onnx": ["int8"]}),
        ])
    """

    @legacy_artifact_parameters
    def __init__(
        self,
        artifacts: Mapping[str, Sequence[str] | None] | Sequence[str] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        output_dir: str | os.PathLike | None = None,
        val_batches: int | None = None,
        batch_size: int = 1,
        calibration_batches: int = 8,
        calibration_split: str = "train",
        model_attribute: str = "model",
        prefix: str = "model_",
        on_failure: str = "raise",
        weights: str | None = None,
        float_layers: Sequence[str] = (),
        **legacy: Any,
    ) -> None:
        artifacts, options = artifacts_from_arguments(artifacts, options, legacy, "MobileExport")
        config = ExportConfig(
            artifacts,
            options,
            output_dir=output_dir,
            val_batches=val_batches,
            batch_size=batch_size,
            calibration_batches=calibration_batches,
            calibration_split=calibration_split,
            prefix=prefix,
            float_layers=tuple(float_layers),
        )
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
