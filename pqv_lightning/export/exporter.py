"""Export a vision model to mobile/edge formats and verify every file in its own runtime.

Formats: TorchScript (``.pt``), TorchScript lite interpreter (``.ptl``), ExecuTorch (``.pte``), ONNX (``.onnx``) and
AOTInductor packages for x86 (``.pt2``). A file only counts as a result once it has been loaded back in its own
runtime (:func:`~pqv_lightning.export.load_artifact`) and its outputs on every validation image have been compared
with the eager float model (:mod:`~pqv_lightning.export.verify`). A file that fails the check is kept on disk but
marked ``"failed"`` in its record, with the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pqv_lightning.export.aoti import write_aoti
from pqv_lightning.export.executorch import write_executorch, write_executorch_variant
from pqv_lightning.export.formats import (
    AOTI_PRECISIONS,
    EXECUTORCH_PRECISIONS,
    ONNX_PRECISIONS,
    check_attention,
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

__all__ = ["FLOAT_LAYER_FILES", "check_output_dir", "export_artifacts", "qat_lowerable"]

#: The quantized files that can keep layers in float: ``float_layers`` keys (format-precision).
FLOAT_LAYER_FILES = (
    "executorch-int8", "executorch-int8_dynamic", "executorch-int4", "onnx-int8", "onnx-int8_qdq", "aoti-int8",
)  # fmt: skip


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


def qat_lowerable(variant: QuantizedModel) -> bool:
    """Whether a variant is a QAT model ExecuTorch lowers as it is (INT8 PT2E for XNNPACK, INT4 weights)."""
    return variant.origin == "qat" and str(variant.target) in ("int8_pt2e:xnnpack", "int4_weight:xnnpack")


def _check_float_layers(
    model: nn.Module, float_layers: Sequence[str] | Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """``float_layers`` as ``{file: layer names}`` (a plain list applies to every file in FLOAT_LAYER_FILES),
    each pattern resolved against ``model``."""
    from pqv_lightning.quantization.layers import resolve_float_layers

    if isinstance(float_layers, str) or not isinstance(float_layers, Mapping):
        float_layers = dict.fromkeys(FLOAT_LAYER_FILES, tuple(float_layers))
    resolved = {}
    for key, patterns in float_layers.items():
        if key not in FLOAT_LAYER_FILES:
            raise invalid("float_layers", key, f"a dict keyed by {', '.join(FLOAT_LAYER_FILES)}, or a list of layers")
        resolved[key] = resolve_float_layers(model, patterns, "int8_pt2e", name=f"float_layers[{key!r}]")
    return resolved


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
    aoti_precisions: Sequence[str] = ("fp32", "int8"),
    *,
    thresholds: VerifyThresholds | None = None,
    onnx_per_channel: bool = True,
    onnx_reduce_range: bool = False,
    onnx_optimize: bool = True,
    prefix: str = "model_",
    on_record: Callable[[list[ArtifactRecord]], None] | None = None,
    float_layers: Sequence[str] | Mapping[str, Sequence[str]] = (),
    executorch_attention: str = "fp32",
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

    ``aoti`` packages (:mod:`~pqv_lightning.export.aoti`) are compiled for this machine's x86 CPU: ``fp32`` and
    ``int8`` (PT2E x86 static, calibrated on ``calibration``, oneDNN int8 kernels).

    ``executorch_attention="fp16"`` runs the attention products of every ``.pte`` in fp16 inside the XNNPACK
    delegate (native on CPUs with fp16 arithmetic; see :func:`~pqv_lightning.export.export_pte`).

    ``on_record(records)`` is called with the records so far each time one is final (verified, failed or
    skipped), e.g. to rewrite the manifest as the export goes.
    """
    fmts = validate_formats(formats)
    et_precisions = validate_precisions(executorch_precisions, EXECUTORCH_PRECISIONS, "executorch")
    ox_precisions = validate_precisions(onnx_precisions, ONNX_PRECISIONS, "onnx")
    aoti_precisions = validate_precisions(aoti_precisions, AOTI_PRECISIONS, "aoti")
    check_attention(executorch_attention, et_precisions if "executorch" in fmts else (), "executorch_attention")
    check_example_input(example_input)
    check_val_batches(val_batches, example_input)
    needs_calibration = [f"executorch {p}" for p in et_precisions if "executorch" in fmts and p == "int8"]
    needs_calibration += [f"onnx {p}" for p in ox_precisions if "onnx" in fmts and p == "int8_qdq"]
    needs_calibration += [f"aoti {p}" for p in aoti_precisions if "aoti" in fmts and p == "int8"]
    if needs_calibration and not calibration:
        raise invalid(
            "calibration", described(calibration), f"image batches: {', '.join(needs_calibration)} need calibration"
        )
    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    check_bool("onnx_optimize", onnx_optimize)
    _check_quantized(quantized)
    keep = _check_float_layers(model, float_layers)
    out = check_output_dir(out_dir)
    thresholds = thresholds or VerifyThresholds()
    example_input = example_input.detach().float().cpu().contiguous()

    was_training = model.training
    model.eval()
    try:
        pieces = reference_pieces(model, val_batches, example_input.shape[0])
        writer = ArtifactWriter(out, example_input, pieces, thresholds, prefix, on_record)
        trained = [q for q in quantized if q.origin == "qat"]
        if "torchscript" in fmts or "lite" in fmts:
            write_torchscript(writer, model, fmts, [q for q in quantized if q.origin != "qat"])
        for variant in trained:
            for fmt in [f for f in ("torchscript", "lite", "onnx", "aoti") if f in fmts] + (
                [] if qat_lowerable(variant) or "executorch" not in fmts else ["executorch"]
            ):
                writer.record(
                    f"{fmt}-{variant.name}", fmt, variant.target.precision, variant.target.backend,
                    status="skipped", reason=f"a quantization-aware-trained {variant.target} model is exported to "
                    "executorch only (ONNX files are quantized by onnxruntime, TorchScript takes torch.ao models)",
                )  # fmt: skip
        if "executorch" in fmts:
            et_keep = {p: keep.get(f"executorch-{p}", ()) for p in et_precisions}
            write_executorch(writer, model, et_precisions, calibration, et_keep, executorch_attention)
            for variant in filter(qat_lowerable, trained):  # verified against the QAT model's converted form
                float_pieces = writer.pieces
                writer.pieces = reference_pieces(variant.module, val_batches, example_input.shape[0])
                try:
                    write_executorch_variant(writer, variant)
                finally:
                    writer.pieces = float_pieces
        if "onnx" in fmts:
            ox_keep = {p: keep.get(f"onnx-{p}", ()) for p in ox_precisions}
            write_onnx(
                writer, model, ox_precisions, calibration, onnx_per_channel, onnx_reduce_range, onnx_optimize, ox_keep
            )
        if "aoti" in fmts:
            write_aoti(writer, model, aoti_precisions, calibration, keep.get("aoti-int8", ()))
    finally:
        model.train(was_training)
    return writer.records
