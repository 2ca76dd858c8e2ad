"""The export stage of the fit-end chain: its config, the files it writes and verifies, and its manifest."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqv_lightning.checkpoint import current_structure
from pqv_lightning.export import ArtifactRecord, export_artifacts, write_manifest
from pqv_lightning.export.formats import (
    artifacts_from_arguments,
    check_model_requests,
    float_layer_files,
    get_format,
    legacy_artifact_parameters,
    needs_calibration,
    resolve_artifacts,
    resolve_options,
)
from pqv_lightning.pipeline.data import CALIBRATION_SPLITS, check_stage_dir
from pqv_lightning.quantization import MixedPrecision, QuantizationResult, resolve_float_layers, round_weights
from pqv_lightning.utils.checks import check_choice, check_int, invalid
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.modules import cpu_float_copy
from pqv_lightning.utils.progress import Progress

__all__ = ["MANIFEST_NAME", "ExportConfig", "ExportOutcome", "artifacts_table", "export_float_layers", "export_stage"]

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True, init=False)
class ExportConfig:
    """Deployable files of the trained model and of its quantized variants, each verified in its own runtime.

    Args:
        artifacts: the files, ``{format: precisions}``: e.g. ``{"executorch": ["fp32", "int8"], "onnx": ["int8"]}``;
            ``None`` precisions are the format's defaults, a list of formats takes each at its defaults, and
            ``None`` (the default) every default format (torchscript, lite, executorch, onnx). The formats, their
            precisions and defaults are in :mod:`pqv_lightning.export.formats` (``list_formats()``).
        options: the formats' settings, e.g. ``{"executorch": {"attention": "fp16"}, "onnx": {"optimize": False}}``.
        output_dir: where the files and ``manifest.json`` go (the Lightning face defaults it to the log dir).
        val_batches: validation batches every artifact is verified on (``None``: all).
        batch_size: the fixed batch size the files are exported for.
        calibration_batches: batches of ``calibration_split`` for the calibrated precisions.
        calibration_split: ``"train"`` or ``"val"``.
        prefix: file name prefix (``<prefix><variant>.<ext>``).
        float_layers: layers the quantized files keep in float (names or globs of layers or blocks). Empty: those the
            matching ``Quantization`` target chose when there is one (each format names its target, e.g.
            ``int8_pt2e:xnnpack`` for executorch int8), else none.

    The keys of 0.1 (``formats``, ``<format>_precisions`` such as ``executorch_precisions``, ``<format>_<option>``
    such as ``executorch_attention``) are still accepted, with a deprecation warning naming the new form.

    Raises:
        InvalidArgumentError: an unknown format, precision or option, a combination a format refuses, a calibrated
            precision with ``calibration_batches=0``, or any value out of range.

    Example::

        ExportConfig(artifacts={"executorch": ["fp32", "int8"], "onnx": ["fp32", "int8"]}, output_dir="artifacts")
    """

    artifacts: dict[str, tuple[str, ...]]
    options: dict[str, dict[str, Any]]
    output_dir: Path | None
    val_batches: int | None
    batch_size: int
    calibration_batches: int
    calibration_split: str
    prefix: str
    float_layers: tuple[str, ...]

    @legacy_artifact_parameters
    def __init__(
        self,
        artifacts: Mapping[str, Sequence[str] | None] | Sequence[str] | str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        val_batches: int | None = None,
        batch_size: int = 1,
        calibration_batches: int = 8,
        calibration_split: str = "train",
        prefix: str = "model_",
        float_layers: Sequence[str] = (),
        **legacy: Any,
    ) -> None:
        artifacts, options = artifacts_from_arguments(artifacts, options, legacy, "ExportConfig")
        requested = resolve_artifacts(artifacts)
        settings = {
            "artifacts": requested,
            "options": resolve_options(options, requested),
            "output_dir": check_stage_dir(output_dir),
            "val_batches": check_int("val_batches", val_batches, 1, allow_none=True),
            "batch_size": check_int("batch_size", batch_size, 1),
            "calibration_batches": check_int("calibration_batches", calibration_batches, 0),
            "calibration_split": check_choice("calibration_split", calibration_split, CALIBRATION_SPLITS),
            "prefix": prefix,
            "float_layers": MixedPrecision(tuple(float_layers)).float_layers,
        }
        for key, value in settings.items():
            object.__setattr__(self, key, value)
        calibrated = needs_calibration(requested)
        if calibration_batches == 0 and calibrated:
            raise invalid(
                "calibration_batches",
                0,
                f"an int >= 1, because {' / '.join(calibrated)} calibrate on data (or drop those precisions)",
            )
        if not isinstance(prefix, str) or os.sep in prefix or (os.altsep and os.altsep in prefix):
            raise invalid("prefix", prefix, "a file name prefix without path separators")

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats that write at least one file."""
        return tuple(fmt for fmt, precisions in self.artifacts.items() if precisions)

    @property
    def needs_calibration(self) -> bool:
        """Whether these formats and precisions calibrate on images."""
        return bool(needs_calibration(self.artifacts))

    def check_model(self, model: nn.Module) -> None:
        """Raise before any work when a float layer matches nothing in ``model``, or a format refuses the model
        with its options (e.g. fp16 attention without attention blocks)."""
        resolve_float_layers(model, self.float_layers, "int8_pt2e")
        check_model_requests(model, self.artifacts, self.options)


@dataclass
class ExportOutcome:
    """What the export stage produced: one record per artifact, the manifest, and a whole-stage error."""

    records: list[ArtifactRecord] = field(default_factory=list)
    manifest: Path | None = None
    error: str | None = None


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
    progress: Progress | None = None,
    rounding: tuple[str, bool] = ("nearest", False),
) -> ExportOutcome:
    """Export a CPU copy of ``model`` (and the ``quantized`` variants the formats take), verify every file, and
    write the manifest; one ``progress`` step per file. ``rounding`` (``(rounding, bias_correction)``, as
    :class:`~pqv_lightning.pipeline.QuantizationConfig` has them) rounds the weights of the quantized files whose
    format names their weight grid (``ExportFormat.weight_grids``) on ``calibration`` first.

    Never raises for a failure of the export itself: per-artifact failures are in the records, and a failure
    of the whole call is the outcome's ``error`` (also written to the manifest's ``meta.error``).
    """
    out = Path(out_dir)
    manifest = out / MANIFEST_NAME
    variants = [r.quantized for r in quantized if r.quantized is not None]
    float_model = cpu_float_copy(model)
    batch_size = config.batch_size
    example = val_batches[0][0][:batch_size]
    if example.shape[0] < batch_size:
        example = torch.cat([example, example[-1:].expand(batch_size - example.shape[0], *example.shape[1:])])
    float_layers = export_float_layers(config, quantized)
    meta = dict(meta or {})
    meta.update(
        artifacts={fmt: list(precisions) for fmt, precisions in config.artifacts.items()},
        options=config.options,
        batch_size=batch_size,
        verified_on_images=sum(int(labels.shape[0]) for _, labels in val_batches),
        quantized_variants=[q.name for q in variants],
        parameters=sum(p.numel() for p in float_model.parameters()),
        pruned=current_structure(model) is not None,
        float_layers={key: list(layers) for key, layers in float_layers.items() if layers},
    )
    outcome = ExportOutcome(manifest=manifest)
    weights: dict[str, nn.Module] = {}
    if rounding != ("nearest", False) and calibration:
        try:
            weights, meta["rounding"] = rounded_sources(
                float_model, config.artifacts, calibration, float_layers, *rounding
            )
        except Exception as err:  # the files are still written, from the model as it is
            meta["rounding"] = {"error": error_summary(err)}
    unwritten: list[str] = []
    progress = progress or Progress.silent()
    shown: list[ArtifactRecord] = []
    last = [time.perf_counter()]

    def record_progress(records: list[ArtifactRecord]) -> None:
        # the manifest after every final record, so that a killed export still leaves what it verified
        try:
            write_manifest(records, manifest, {**meta, "complete": False})
        except OSError as err:
            unwritten.append(error_summary(err))
        for record in records[len(shown) :]:
            now = time.perf_counter()
            progress.step(record.name, f"{_outcome(record)} ({now - last[0]:.1f} s)")
            last[0] = now
            shown.append(record)

    start = time.perf_counter()
    with progress.stage("export", _expected_files(config, variants)):
        try:
            outcome.records = export_artifacts(
                float_model,
                out,
                config.artifacts,
                example.contiguous(),
                val_batches,
                quantized=variants,
                calibration=calibration,
                on_record=record_progress,
                float_layers=float_layers,
                options=config.options,
                prefix=config.prefix,
                weights=weights,
            )
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


def rounded_sources(
    model: nn.Module,
    artifacts: Mapping[str, Sequence[str]],
    calibration: Sequence[torch.Tensor],
    float_layers: Mapping[str, Sequence[str]],
    rounding: str,
    bias_correction: bool,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """For each asked-for quantized file whose format names its weight grid, ``model`` with weights rounded for that
    grid (one rounding per grid and float layers, shared by the files that agree); and a summary per file."""
    sources: dict[str, nn.Module] = {}
    summaries: dict[str, str] = {}
    done: dict[tuple[str, tuple[str, ...]], tuple[nn.Module, str]] = {}
    for fmt, precisions in artifacts.items():
        for precision in precisions:
            target = get_format(fmt).weight_grids.get(precision)
            if target is None:
                continue
            key = f"{fmt}-{precision}"
            skip = tuple(float_layers.get(key, ()))
            if (target, skip) not in done:
                result = round_weights(model, target, calibration, rounding, bias_correction, None, skip)
                done[(target, skip)] = (result.model, result.summary())
            sources[key], summaries[key] = done[(target, skip)]
    return sources, summaries


def _expected_files(config: ExportConfig, variants: Sequence[Any]) -> int:
    """How many records the export will make: a file per precision (per variant for a precision that is the
    quantization stage's variants) and a file or a skipped record per format and quantization-aware variant."""
    trained = sum(v.origin == "qat" for v in variants)
    post_training = len(variants) - trained
    count = 0
    for name, precisions in config.artifacts.items():  # a format with no precision still takes the QAT variants
        from_variants = get_format(name).from_variants
        count += sum(post_training if p in from_variants else 1 for p in precisions) + trained
    return count


def _outcome(record: ArtifactRecord) -> str:
    """A record's outcome in a few words (a progress line)."""
    if record.status == "ok":
        return f"verified (agreement {record.top1_agreement:.4f})"
    reason = record.reason or ""
    return f"{record.status}: {reason if len(reason) <= 80 else reason[:79] + '…'}"


def export_float_layers(config: ExportConfig, results: Sequence[QuantizationResult]) -> dict[str, tuple[str, ...]]:
    """The float layers of each quantized file: the export config's own, else those of the quantization target the
    file's format names (e.g. chosen by a float budget), so that the files ship the precision the variant was
    measured at."""
    if config.float_layers:
        return dict.fromkeys(float_layer_files(), config.float_layers)
    chosen: dict[str, tuple[str, ...]] = {}
    for key in float_layer_files():
        fmt, _, precision = key.partition("-")
        spec = get_format(fmt).float_layers[precision]
        match = next(
            (
                r
                for r in results
                if r.origin == "ptq" and r.quantized is not None and (str(r.target) == spec or r.target.method == spec)
            ),
            None,
        )
        chosen[key] = tuple(match.float_layers) if match is not None else ()
    return chosen
