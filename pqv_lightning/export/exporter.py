"""Export a vision model to mobile/edge formats and verify every file in its own runtime.

Formats: TorchScript (``.pt``), TorchScript lite interpreter (``.ptl``), ExecuTorch (``.pte``) and ONNX
(``.onnx``). A file only counts as a result once it has been loaded back in its own runtime
(:func:`~pqv_lightning.export.load_artifact`) and its outputs on every validation image have been compared with
the eager float model (:mod:`~pqv_lightning.export.verify`). A file that fails the check is kept on disk but
marked ``"failed"`` in its record, with the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pqv_lightning.export.executorch import write_executorch
from pqv_lightning.export.formats import (
    EXECUTORCH_PRECISIONS,
    ONNX_PRECISIONS,
    validate_formats,
    validate_precisions,
)
from pqv_lightning.export.inputs import check_example_input, check_val_batches, described
from pqv_lightning.export.manifest import ArtifactRecord
from pqv_lightning.export.onnx import write_onnx
from pqv_lightning.export.torchscript import write_torchscript
from pqv_lightning.export.verify import VerifyThresholds, reference_pieces
from pqv_lightning.export.writer import ArtifactWriter
from pqv_lightning.utils.checks import check_bool, invalid

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
        names.append(q.target.name)
    if len(set(names)) != len(names):
        raise invalid("quantized", names, "QuantizedModel objects of distinct targets")


def export_artifacts(
    model: nn.Module,
    out_dir: str | os.PathLike,
    formats: Sequence[str],
    example_input: Tensor,
    val_batches: Sequence[tuple[Tensor, Tensor]],
    quantized: Sequence[QuantizedModel] = (),
    calibration: Sequence[Tensor] | None = None,
    executorch_precisions: Sequence[str] = ("fp32", "int8", "int4"),
    onnx_precisions: Sequence[str] = ("fp32", "int8"),
    *,
    thresholds: VerifyThresholds | None = None,
    onnx_per_channel: bool = True,
    onnx_reduce_range: bool = False,
    onnx_optimize: bool = True,
    prefix: str = "model_",
    on_record: Callable[[list[ArtifactRecord]], None] | None = None,
) -> list[ArtifactRecord]:
    """Export ``model`` (and TorchScript-able ``quantized`` variants) in ``formats`` and verify each file.

    Every artifact is loaded back in its own runtime and run on all of ``val_batches``; its record holds
    top-1 agreement with the eager float model, the largest |logit difference|, and val top-1/top-5
    computed from the runtime's outputs. A failure in one format or precision is recorded (exception type
    and message) and the others go on. Files are named ``{prefix}{variant}.{ext}`` inside ``out_dir``.
    Every artifact is exported for the fixed input shape of ``example_input`` (recorded per artifact).

    ONNX int8 uses onnxruntime dynamic quantization with per-channel weights by default (ViT linear layers
    have rows of very different ranges; per-tensor scales cost accuracy) and ``reduce_range=False`` (7-bit
    weights only help on x86 CPUs without VNNI, at a cost in accuracy everywhere else). ``"int8_qdq"`` adds
    a static QDQ model calibrated on ``calibration``.

    With ``onnx_optimize`` (default) ONNX int8 is quantized from an onnxruntime-optimized graph: the model is
    first rewritten by :func:`~pqv_lightning.export.prepare_for_onnxruntime` (same function), onnxruntime's
    transformer optimizer fuses each attention into one ``Attention`` node (quantized to ``QAttention``),
    LayerNorm and GELU into their fused ops, and its ``SkipLayerNormalization`` nodes are turned back into
    ``Add`` + ``LayerNormalization`` (faster on CPU). If any of that fails, the plain exported graph is quantized
    and the reason recorded (``extra["onnxruntime_optimization_failed"]``); the file is verified either way.

    ``on_record(records)`` is called with the records so far each time one is final (verified, failed or
    skipped), e.g. to rewrite the manifest as the export goes.
    """
    fmts = validate_formats(formats)
    et_precisions = validate_precisions(executorch_precisions, EXECUTORCH_PRECISIONS, "executorch")
    ox_precisions = validate_precisions(onnx_precisions, ONNX_PRECISIONS, "onnx")
    check_example_input(example_input)
    check_val_batches(val_batches, example_input)
    needs_calibration = [f"executorch {p}" for p in et_precisions if "executorch" in fmts and p == "int8"]
    needs_calibration += [f"onnx {p}" for p in ox_precisions if "onnx" in fmts and p == "int8_qdq"]
    if needs_calibration and not calibration:
        raise invalid(
            "calibration", described(calibration), f"image batches: {', '.join(needs_calibration)} need calibration"
        )
    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    check_bool("onnx_optimize", onnx_optimize)
    _check_quantized(quantized)
    out = check_output_dir(out_dir)
    thresholds = thresholds or VerifyThresholds()
    example_input = example_input.detach().float().cpu().contiguous()

    was_training = model.training
    model.eval()
    try:
        pieces = reference_pieces(model, val_batches, example_input.shape[0])
        writer = ArtifactWriter(out, example_input, pieces, thresholds, prefix, on_record)
        if "torchscript" in fmts or "lite" in fmts:
            write_torchscript(writer, model, fmts, quantized)
        if "executorch" in fmts:
            write_executorch(writer, model, et_precisions, calibration)
        if "onnx" in fmts:
            write_onnx(writer, model, ox_precisions, calibration, onnx_per_channel, onnx_reduce_range, onnx_optimize)
    finally:
        model.train(was_training)
    return writer.records
