"""ONNX (``.onnx``) files run by onnxruntime: how the FP32, INT8 and INT8 QDQ files are written and run.

Importing this module imports neither torch nor onnxruntime: the loader imports onnxruntime (and numpy) only,
so a process that runs an ONNX file never imports torch.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqv_lightning.export.formats import LoadedArtifact
from pqv_lightning.utils.cpu import cpu_info
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.io import atomic_write

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pqv_lightning.export.writer import ArtifactWriter, ExportJob

__all__ = ["ONNX_OPSET", "load", "ort_session", "prepare_runtime", "random_input", "write"]

log = logging.getLogger(__name__)

ONNX_OPSET = 18  # the torch.onnx (dynamo) exporter's native opset; onnxruntime 1.31 runs it
_LEGACY_OPSET = 17


# --------------------------------------------------------------------------- run


def ort_session(path: str, threads: int | None = None, spinning: bool = False, profile_prefix: str | None = None):
    """An onnxruntime CPU session of ``path``.

    ``threads``: ``intra_op_num_threads`` with inter-op 1 and, unless ``spinning``, idle intra-op workers that
    do not spin; ``None`` keeps onnxruntime's session defaults. ORT's idle workers spin by default; in one
    process next to torch's OpenMP pool (and on a shared machine) that spinning steals the cores the other
    runtimes time on (measured: torch eager 6x slower on 2 cores while an idle spinning ORT session exists).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def load(path: str, kind: str, threads: int | None, engine: str | None, ort_spinning: bool) -> LoadedArtifact:
    """An ONNX file in an onnxruntime session (see :func:`ort_session`); ``engine`` does not apply."""
    session = ort_session(path, threads, ort_spinning)
    name = session.get_inputs()[0].name

    def bind(x: Any):
        feed = {name: x}
        return lambda: session.run(None, feed)

    return LoadedArtifact(kind, lambda x: session.run(None, {name: x})[0], bind, takes_numpy=True)


def prepare_runtime(threads: int | None) -> None:
    """Import onnxruntime (its threads are set per session)."""
    import onnxruntime  # noqa: F401


def random_input(shape: list[int]) -> Any:
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


# --------------------------------------------------------------------------- write


def _export_proto(model: nn.Module, example_input: Tensor, extra: dict):
    """ONNX model proto from the dynamo exporter; the legacy TorchScript exporter if that fails."""
    import io

    import onnx
    import torch

    try:
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, opset_version=ONNX_OPSET, external_data=False, verbose=False
        )
        extra["onnx_exporter"] = "dynamo"
        extra["opset"] = ONNX_OPSET
        return program.model_proto
    except Exception as e:
        extra["onnx_exporter"] = "legacy (torchscript-based)"
        extra["dynamo_failed"] = error_summary(e, limit=600)
        log.warning("torch.onnx dynamo export failed (%s); using the legacy exporter", extra["dynamo_failed"])
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (example_input,),
        buf,
        dynamo=False,
        opset_version=_LEGACY_OPSET,
        input_names=["input"],
        output_names=["logits"],
    )
    extra["opset"] = _LEGACY_OPSET
    return onnx.load_from_string(buf.getvalue())


_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the module path of a node, recorded by the dynamo exporter
_LAYER_OPS = ("MatMul", "Gemm", "Conv")


def _layer_nodes(proto, float_layers: Sequence[str]) -> dict[str, list[str]]:
    """The names of the nodes of an exported graph that compute each float layer (its ``MatMul``/``Gemm``/``Conv``),
    found from the module path the dynamo exporter records per node."""
    import ast

    found: dict[str, list[str]] = {layer: [] for layer in float_layers}
    for node in proto.graph.node:
        if node.op_type not in _LAYER_OPS:
            continue
        scopes = next((entry.value for entry in node.metadata_props if entry.key == _NAME_SCOPES), None)
        if scopes is None:
            continue
        try:
            path = [str(p) for p in ast.literal_eval(scopes)]
        except (ValueError, SyntaxError):
            continue
        for layer in float_layers:
            if any(p == layer or p.startswith(layer + ".") for p in path):
                found[layer].append(node.name)
    return found


def _nodes_to_exclude(
    raw_proto, quantized_input: Path, float_layers: Sequence[str], dynamic: bool
) -> tuple[list[str], list[str]]:
    """(names of the nodes of the graph at ``quantized_input`` that compute the float layers, layers not found).

    onnxruntime's pre-processing and fusions rename what they rewrite by appending to the name
    (``node_MatMul_11/MatMulAddFusion``); a fused ``Attention`` node has no trace of the layers it swallowed.
    """
    import onnx

    by_layer = _layer_nodes(raw_proto, float_layers)
    ops = {n.name: n.op_type for n in onnx.load(str(quantized_input), load_external_data=False).graph.node}
    excluded: list[str] = []
    missing: list[str] = []
    for layer, raw in by_layer.items():
        hits = [name for name in ops if any(name == r or name.startswith(r + "/") for r in raw)]
        if not hits:
            missing.append(layer)
        for name in hits:  # dynamic quantization first splits a Gemm into <name>_MatMul + <name>_Add
            excluded += [name, f"{name}_MatMul"] if dynamic and ops[name] == "Gemm" else [name]
    return list(dict.fromkeys(excluded)), missing


class _CalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over calibration images cut to the export batch size."""

    def __init__(self, input_name: str, images: Sequence[Tensor], batch_size: int) -> None:
        import torch

        flat = torch.cat([t.float() for t in images])
        n = (flat.shape[0] // batch_size) * batch_size
        if n == 0:
            raise ValueError(f"calibration holds {flat.shape[0]} images, fewer than the export batch {batch_size}")
        self._feeds = iter([{input_name: chunk.numpy()} for chunk in flat[:n].split(batch_size)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _pre_process(src: str, dst: str, **kwargs: Any) -> None:
    """onnxruntime's ``quant_pre_process``; where its symbolic shape inference fails (an ``Expand`` of a shape it
    cannot follow: SwinV2's and EdgeNeXt's normalised attention), with ONNX's own shape inference only."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(src, dst, **kwargs)
    except Exception as e:
        log.info("onnx: symbolic shape inference failed (%s); using ONNX shape inference", error_summary(e, limit=200))
        quant_pre_process(src, dst, skip_symbolic_shape=True, **kwargs)


class _OnnxBuilder:
    """The files of one model: the exported graphs are made once and shared by every precision."""

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        work_root: Path,
        calibration: Sequence[Tensor] | None,
        per_channel: bool,
        reduce_range: bool,
        optimize: bool,
        float_layers: dict[str, Sequence[str]] | None = None,
    ) -> None:
        self.model, self.example_input, self.work_root = model, example_input, work_root
        self.calibration, self.per_channel, self.reduce_range, self.optimize = (
            calibration,
            per_channel,
            reduce_range,
            optimize,
        )
        self.float_layers = {k: tuple(v) for k, v in (float_layers or {}).items()}
        from pqv_lightning.tokens import token_reduction_of

        self.tokens = token_reduction_of(model)
        self._plain: tuple[Any, dict] | None = None
        self._prepared: tuple[Any, dict, dict] | None = None

    def fp32_proto(self, extra: dict):
        if self._plain is None:
            made: dict = {}
            self._plain = (_export_proto(self.model, self.example_input, made), made)
        extra.update(self._plain[1])
        return self._plain[0]

    def write_fp32(self, path: Path, extra: dict) -> None:
        import onnx

        proto = self.fp32_proto(extra)
        atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp)))

    def preprocessed(self, work: Path, extra: dict) -> Path:
        import onnx

        src = work / "fp32.onnx"
        onnx.save_model(self.fp32_proto(extra), str(src))
        # onnxruntime's shape inference + graph cleanup: its quantizer fails on raw dynamo graphs without it.
        dst = work / "fp32.pre.onnx"
        _pre_process(str(src), str(dst))
        return dst

    def optimized(self, work: Path, extra: dict) -> Path:
        """The model rewritten by ``prepare_for_onnxruntime``, exported, fused and shape-inferred."""
        from pqv_lightning.export.onnxruntime_rewrites import fuse_for_onnxruntime, prepare_for_onnxruntime

        if self._prepared is None:
            prepared, counts = prepare_for_onnxruntime(self.model)
            made: dict = {}
            self._prepared = (_export_proto(prepared, self.example_input, made), made, counts)
        proto, made, counts = self._prepared
        extra.update(made)
        extra["prepared_for_onnxruntime"] = dict(counts)
        fused = work / "fused.onnx"
        fuse_for_onnxruntime(proto, fused, extra)
        if self.tokens is not None:
            extra["ort_attention_fusion"] = self._attention_fusion(extra["ort_fusions"], counts["attention"])
        dst = work / "fused.pre.onnx"
        _pre_process(str(fused), str(dst), skip_optimization=True)
        return dst

    def _attention_fusion(self, fusions: dict[str, int], blocks: int) -> dict[str, Any]:
        """How many attention blocks of a token-reducing model onnxruntime fused into ``Attention``, and why not the
        others (see :func:`~pqv_lightning.export.onnxruntime_rewrites.fuse_for_onnxruntime`)."""
        fused = int(fusions.get("Attention", 0))
        found: dict[str, Any] = {"fused": fused, "blocks": blocks}
        if fused < blocks:
            found["not_fused"] = (
                "blocks whose attention adds log(size) (proportional attention, after the first merge): "
                "onnxruntime's Attention fusion takes no additive bias"
                if self.tokens.proportional_attention
                else "blocks onnxruntime's Attention fusion did not match"
            )
        return found

    def _write_quantized(self, path: Path, extra: dict, how: str, quantize: Callable[[str], None]) -> None:
        """Record how the file is quantized, then write it atomically with ``quantize(out_path)``."""
        extra.update(quantization=how, per_channel=self.per_channel, reduce_range=self.reduce_range)
        atomic_write(path, lambda tmp: quantize(str(tmp)))

    def _excluded(self, precision: str, raw_proto, src: Path, extra: dict) -> list[str]:
        """The nodes of ``src`` that stay float for ``precision`` (raises when a float layer has none there)."""
        keep = self.float_layers.get(precision, ())
        if not keep:
            return []
        nodes, missing = _nodes_to_exclude(raw_proto, src, keep, dynamic=precision == "int8")
        if missing:
            raise ValueError(f"float layers {missing} have no MatMul/Gemm/Conv node in the ONNX graph")
        extra.update(float_layers=list(keep), float_nodes=nodes)
        return nodes

    def write_int8(self, path: Path, extra: dict) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=self.work_root, prefix=".onnx-work-") as work:
            src = None
            excluded: list[str] = []
            if self.optimize:
                stage: dict = {}
                try:
                    src = self.optimized(Path(work), stage)
                    excluded = self._excluded("int8", self._prepared[0], src, stage)
                    extra.update(stage)
                except Exception as e:  # the plain graph below is still a correct int8 model
                    src, reason = None, error_summary(e, limit=600)
                    extra["onnxruntime_optimization_failed"] = reason
                    log.warning("onnx int8: onnxruntime fusion failed (%s); quantizing the plain graph", reason)
            extra["onnxruntime_optimized"] = src is not None
            if src is None:
                src = self.preprocessed(Path(work), extra)
                excluded = self._excluded("int8", self._plain[0], src, extra)
            self._write_quantized(
                path,
                extra,
                "dynamic (MatMul/Gemm/Attention weights int8, activations uint8 quantized at run time)",
                lambda out: quantize_dynamic(
                    str(src),
                    out,
                    weight_type=QuantType.QInt8,
                    per_channel=self.per_channel,
                    reduce_range=self.reduce_range,
                    nodes_to_exclude=excluded,
                    # float where shape inference left a tensor untyped (the graphs are float models)
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                ),
            )

    def write_qdq(self, path: Path, extra: dict) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not self.calibration:
            raise ValueError("onnx precision 'int8_qdq' needs calibration images")
        with tempfile.TemporaryDirectory(dir=self.work_root, prefix=".onnx-work-") as work:
            src = self.preprocessed(Path(work), extra)
            excluded = self._excluded("int8_qdq", self._plain[0], src, extra)
            input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
            reader = _CalibrationReader(input_name, self.calibration, self.example_input.shape[0])
            self._write_quantized(
                path,
                extra,
                "static QDQ (int8 weights and activations, MinMax calibration)",
                lambda out: quantize_static(
                    str(src),
                    out,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=self.per_channel,
                    reduce_range=self.reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(_LAYER_OPS),
                    nodes_to_exclude=excluded,
                ),
            )


def write(writer: ArtifactWriter, model: nn.Module, job: ExportJob) -> None:
    """Write and verify the ONNX files of ``job`` (the format protocol): ``"fp32"``, ``"int8"``, ``"int8_qdq"``.

    ``int8`` is onnxruntime dynamic quantization; with the ``optimize`` option it quantizes the graph of
    :func:`~pqv_lightning.export.prepare_for_onnxruntime` after :func:`fuse_for_onnxruntime`, and falls back to
    the plain exported graph (recording why) if any of that fails. ``int8_qdq`` is static QDQ calibrated on
    ``job.calibration``. The float layers of each file (module names) stay float: their nodes go to onnxruntime's
    ``nodes_to_exclude``. A layer fused into an ``Attention`` node (the QKV projection) cannot be excluded from
    it, so the plain graph is quantized instead, and the record says why. A token-reducing model's files record
    it (``extra["tokens"]``), and its ``int8`` file how many attention blocks were fused
    (``extra["ort_attention_fusion"]``).
    """
    precisions = job.artifacts.get("onnx", ())
    options = job.options["onnx"]
    float_layers = {p: job.keep("onnx", p) for p in precisions}
    per_channel, reduce_range, optimize = options["per_channel"], options["reduce_range"], options["optimize"]
    if reduce_range == "auto":
        # x86 without VNNI: onnxruntime's u8 x s8 kernels add pairs of products into int16 with saturation, which
        # 8-bit weights overflow (the tests' tiny ViT on 540 held-out digits, AVX2-only AMD EPYC, onnxruntime 1.32:
        # top-1 agreement with the float model 0.978 with 8-bit weights, 0.998 with 7-bit ones)
        reduce_range = not cpu_info().int8_dot_products
    calibration = job.calibration
    builder = _OnnxBuilder(
        model, writer.example_input, writer.out_dir, calibration, per_channel, reduce_range, optimize, float_layers
    )
    files = {
        "fp32": ("onnx-fp32", "fp32", "fp32.onnx", builder.write_fp32),
        "int8": ("onnx-int8", "int8", "int8.onnx", builder.write_int8),
        "int8_qdq": ("onnx-int8_qdq", "int8", "int8_qdq.onnx", builder.write_qdq),
    }
    from pqv_lightning.tokens import token_summary

    tokens = token_summary(model, writer.input_shape[-2:])
    for precision in ("fp32", "int8", "int8_qdq"):
        if precision in precisions:
            name, label, filename, build = files[precision]
            writer.produce(name, "onnx", label, "onnxruntime-cpu", filename, _noting(build, tokens), _verifier)


def _noting(build: Callable[[Path, dict], None], tokens: dict | None) -> Callable[[Path, dict], None]:
    """``build`` that also records the token reduction the file runs (``extra["tokens"]``), if any."""

    def noted(path: Path, extra: dict) -> None:
        build(path, extra)
        if tokens is not None:
            extra["tokens"] = tokens

    return noted


def _verifier(path: Path):
    return load(str(path), "onnx", None, None, False).predict
