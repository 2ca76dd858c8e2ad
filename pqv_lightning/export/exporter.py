"""Export a vision model to mobile/edge formats and verify every file in its own runtime.

The formats are those of the registry (:mod:`~pqv_lightning.export.formats`); each format's module writes its
files (the format protocol), this module checks the request once and calls them in registry order. A file only
counts as a result once it has been loaded back in its own runtime (:func:`~pqv_lightning.export.load_artifact`)
and its outputs on every validation image have been compared with the eager float model
(:mod:`~pqv_lightning.export.verify`). A file that fails the check is kept on disk but marked ``"failed"`` in its
record, with the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pqv_lightning.export.formats import (
    ExportFormat,
    artifacts_from_arguments,
    check_model_requests,
    float_layer_files,
    list_formats,
    needs_calibration,
    resolve_artifacts,
    resolve_options,
)
from pqv_lightning.export.inputs import check_example_input, check_val_batches, described
from pqv_lightning.export.manifest import ArtifactRecord
from pqv_lightning.export.verify import VerifyThresholds, reference_pieces
from pqv_lightning.export.writer import ArtifactWriter, ExportJob
from pqv_lightning.utils.checks import invalid

if TYPE_CHECKING:
    from pqv_lightning.quantization import QuantizedModel

__all__ = ["check_output_dir", "export_artifacts"]


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable (by writing and removing a probe file)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export output dir {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".pqv-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"export output dir {str(out)!r} is not writable: {e}") from e
    return out


def _check_quantized(quantized: Sequence[QuantizedModel]) -> None:
    names = []
    for i, q in enumerate(quantized):
        if not (hasattr(q, "target") and isinstance(getattr(q, "module", None), nn.Module)):
            raise invalid(f"quantized[{i}]", described(q), "a QuantizedModel")
        names.append(q.name)
    if len(set(names)) != len(names):
        raise invalid("quantized", names, "QuantizedModel objects of distinct names (targets)")


def _check_float_layers(
    model: nn.Module, float_layers: Sequence[str] | Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """``float_layers`` as ``{file: layer names}`` (a plain list applies to every file that can keep float layers,
    :func:`~pqv_lightning.export.formats.float_layer_files`), each pattern resolved against ``model``."""
    from pqv_lightning.quantization.layers import resolve_float_layers

    files = float_layer_files()
    if isinstance(float_layers, str) or not isinstance(float_layers, Mapping):
        float_layers = dict.fromkeys(files, tuple(float_layers))
    resolved = {}
    for key, patterns in float_layers.items():
        if key not in files:
            raise invalid("float_layers", key, f"a dict keyed by {', '.join(files)}, or a list of layers")
        resolved[key] = resolve_float_layers(model, patterns, "int8_pt2e", name=f"float_layers[{key!r}]")
    return resolved


def export_artifacts(
    model: nn.Module,
    out_dir: str | os.PathLike,
    artifacts: Mapping[str, Sequence[str] | None] | Sequence[str] | str | None = None,
    example_input: Tensor | None = None,
    val_batches: Sequence[tuple[Tensor, Tensor]] = (),
    quantized: Sequence[QuantizedModel] = (),
    calibration: Sequence[Tensor] | None = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    thresholds: VerifyThresholds | None = None,
    prefix: str = "model_",
    on_record: Callable[[list[ArtifactRecord]], None] | None = None,
    float_layers: Sequence[str] | Mapping[str, Sequence[str]] = (),
    weights: Mapping[str, nn.Module] | None = None,
    **legacy: Any,
) -> list[ArtifactRecord]:
    """Export ``model`` (and the ``quantized`` variants a format takes) as ``artifacts`` and verify each file.

    ``artifacts`` is ``{format: precisions}`` (``None`` precisions: the format's defaults), a list of formats at their
    default precisions, or ``None`` for every default format (:func:`~pqv_lightning.export.formats.resolve_artifacts`;
    the formats and their precisions are in :mod:`~pqv_lightning.export.formats`). ``options`` are the formats'
    settings, e.g. ``{"executorch": {"attention": "fp16"}, "onnx": {"optimize": False}}``.

    Every artifact is loaded back in its own runtime and run on all of ``val_batches``; its record holds
    top-1 agreement with the eager float model, the largest |logit difference|, and val top-1/top-5
    computed from the runtime's outputs. A failure in one format or precision is recorded (exception type
    and message) and the others go on. Files are named ``{prefix}{variant}.{ext}`` inside ``out_dir``.
    Every artifact is exported for the fixed input shape of ``example_input`` (recorded per artifact).
    ``calibration`` calibrates the precisions that need it; ``float_layers`` (a list for every quantized file, or
    ``{"<format>-<precision>": layers}``) stay in float. ``on_record(records)`` is called with the records so far
    each time one is final (verified, failed or skipped), e.g. to rewrite the manifest as the export goes.
    ``weights`` (``{"<format>-<precision>": float model}``) are the models quantized files are built from instead of
    ``model`` (weights rounded for the file's grid); every file is still verified against ``model``.

    The keyword arguments of 0.1 (``executorch_precisions=...``, ``onnx_optimize=...``, ...) still work, with a
    deprecation warning that names the new form.

    Raises:
        InvalidArgumentError: a format, precision, option, input, float layer or variant is not accepted, or a
            calibrated precision has no ``calibration`` (before anything is exported).
        PermissionError, NotADirectoryError: ``out_dir`` cannot be written.

    Example::

        records = export_artifacts(model, "artifacts", {"executorch": ["fp32", "int8"], "onnx": ["int8"]},
                                   images[:1], [(images, labels)], calibration=[images])
    """
    artifacts, options = artifacts_from_arguments(artifacts, options, legacy, "export_artifacts", none_is_unset=False)
    requested = resolve_artifacts(artifacts)
    resolved_options = resolve_options(options, requested)
    check_example_input(example_input)
    check_val_batches(val_batches, example_input)
    calibrated = needs_calibration(requested)
    if calibrated and not calibration:
        raise invalid("calibration", described(calibration), f"image batches: {', '.join(calibrated)} need calibration")
    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    _check_quantized(quantized)
    job = ExportJob(
        artifacts=requested,
        options=resolved_options,
        calibration=calibration,
        float_layers=_check_float_layers(model, float_layers),
        quantized=[q for q in quantized if q.origin != "qat"],
        trained=[q for q in quantized if q.origin == "qat"],
        weights=dict(weights or {}),
    )
    check_model_requests(model, requested, resolved_options)
    out = check_output_dir(out_dir)
    thresholds = thresholds or VerifyThresholds()
    example_input = example_input.detach().float().cpu().contiguous()

    was_training = model.training
    model.eval()
    try:
        pieces = reference_pieces(model, val_batches, example_input.shape[0])
        writer = ArtifactWriter(out, example_input, pieces, thresholds, prefix, on_record, val_batches)
        _skip_trained(writer, job)
        written: set[str] = set()
        for fmt in _requested_formats(requested):  # with no precision of its own a format may still take variants
            if fmt.module not in written:  # one call per module: it writes every format it implements
                written.add(fmt.module)
                fmt.implementation().write(writer, model, job)
    finally:
        model.train(was_training)
    return writer.records


def _requested_formats(artifacts: Mapping[str, Sequence[str]]) -> list[ExportFormat]:
    """Every format named in ``artifacts``, in registry order, those with no precision of their own included."""
    return [fmt for fmt in list_formats() if fmt.name in artifacts]


def _skip_trained(writer: ArtifactWriter, job: ExportJob) -> None:
    """A skipped record per quantization-aware-trained variant and format that does not take one."""
    for variant in job.trained:
        for fmt in _requested_formats(job.artifacts):
            if not fmt.takes_trained:
                writer.record(
                    f"{fmt.name}-{variant.name}",
                    fmt.name,
                    variant.target.precision,
                    variant.target.backend,
                    status="skipped",
                    reason=f"a quantization-aware-trained {variant.target} model is exported to "
                    f"{', '.join(f.name for f in list_formats() if f.takes_trained)} only ({fmt.name} files are "
                    "quantized from the float model or take torch.ao variants)",
                )
