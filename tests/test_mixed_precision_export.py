"""Float layers in the files: the ExecuTorch ``.pte`` (float parts still in the XNNPACK delegate) and ONNX
(onnxruntime's node exclusion), chosen by name or by a budget in the fit-end chain, recorded in the manifest, and
the sensitivity in the report."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from pqv_lightning.export import export_artifacts
from pqv_lightning.pipeline import ExportConfig, QuantizationConfig, ReportConfig, run_pipeline

KEEP = ["blocks.1.mlp", "head"]
KEPT = ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head"]


@pytest.fixture(scope="module")
def data(digit_tensors):
    val = list(zip(digit_tensors["x_heldout"][:192].split(96), digit_tensors["y_heldout"][:192].split(96), strict=True))
    calibration = list(digit_tensors["x_train"][:128].split(64))
    return val, calibration


def _quantized_ops(path: str) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in onnx.load(path).graph.node]


def test_files_keep_the_float_layers(trained_tiny_vit, data, tmp_path):
    val, calibration = data
    records = export_artifacts(
        trained_tiny_vit, tmp_path, ["executorch", "onnx"], val[0][0][:1], val, calibration=calibration,
        executorch_precisions=("int8",), onnx_precisions=("int8", "int8_qdq"), float_layers=KEEP,
    )  # fmt: skip
    by_name = {r.name: r for r in records}
    for name in ("executorch-int8", "onnx-int8", "onnx-int8_qdq"):
        assert by_name[name].status == "ok", by_name[name].reason
        assert by_name[name].extra["float_layers"] == KEPT
    assert by_name["executorch-int8"].extra["outside_ops"] == {}  # the float layers run in the delegate, in fp32
    dynamic = by_name["onnx-int8"]
    assert dynamic.extra["onnxruntime_optimized"] is True  # MLP and head layers are not fused away
    ops = dict((name, op) for op, name in _quantized_ops(dynamic.path))
    kept = [node for node in dynamic.extra["float_nodes"] if node in ops]
    assert len(kept) == 3 and all(ops[node] == "MatMul" for node in kept)  # left float, not MatMulInteger
    assert not any(op == "MatMulInteger" and name.startswith(tuple(kept)) for name, op in ops.items())
    assert sum(op == "MatMulInteger" for op in ops.values()) > 0  # the rest is quantized
    static = by_name["onnx-int8_qdq"]
    assert len(static.extra["float_nodes"]) == 3


def test_a_fused_attention_layer_falls_back_to_the_plain_graph(trained_tiny_vit, data, tmp_path):
    val, _ = data
    (record,) = export_artifacts(
        trained_tiny_vit, tmp_path, ["onnx"], val[0][0][:1], val, onnx_precisions=("int8",),
        float_layers={"onnx-int8": ["blocks.0.attn.qkv"]},
    )  # fmt: skip
    assert record.status == "ok", record.reason
    assert record.extra["onnxruntime_optimized"] is False
    assert "blocks.0.attn.qkv" in record.extra["onnxruntime_optimization_failed"]
    assert record.extra["float_layers"] == ["blocks.0.attn.qkv"]
    ops = dict((name, op) for op, name in _quantized_ops(record.path))
    assert [ops[node] for node in record.extra["float_nodes"] if node in ops] == ["MatMul"]  # the qkv, in float


def test_bad_float_layers_are_refused_before_any_file(trained_tiny_vit, data, tmp_path):
    val, _ = data
    with pytest.raises(ValueError, match=r"float_layers\['executorch-int4'\]\[0\]='blocks.0.mlp.fc7' is invalid"):
        export_artifacts(trained_tiny_vit, tmp_path / "a", ["executorch"], val[0][0][:1], val,
                         executorch_precisions=("int4",),
                         float_layers={"executorch-int4": ["blocks.0.mlp.fc7"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"float_layers='torchscript-int8' is invalid; accepted: a dict keyed by"):
        export_artifacts(trained_tiny_vit, tmp_path / "b", ["onnx"], val[0][0][:1], val,
                         float_layers={"torchscript-int8": ["head"]})  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_chain_ships_the_budget_and_reports_the_sensitivity(trained_tiny_vit, data, tmp_path):
    val, calibration = data
    train = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calibration]
    result = run_pipeline(
        trained_tiny_vit, val, train,
        quantization=QuantizationConfig(("int4_weight", "int8_dynamic:x86"), 2, max_float_layers=1,
                                        sensitivity=("int8_dynamic:x86",), granularity="block"),
        export=ExportConfig({"executorch": ["int4"], "onnx": ["int8"]}, output_dir=tmp_path / "artifacts",
                            calibration_batches=2),
        report=ReportConfig(tmp_path / "report", warmup=1, runs=3, batch=None, memory=False, profile=None),
    )  # fmt: skip
    int4, dynamic = result.quantization
    assert int4.error is None and dynamic.error is None
    for r in (int4, dynamic):
        assert r.plan.steps and len(r.plan.float_units) == 1
        assert r.float_layers == r.plan.sensitivity.layers_of(r.plan.sensitivity.ranking()[0])
    records = {r.name: r for r in result.export.records}
    assert records["executorch-int4"].extra["float_layers"] == int4.float_layers  # the file ships what was measured
    assert records["onnx-int8"].extra["float_layers"] == dynamic.float_layers
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert manifest["meta"]["quantization"]["variants"]["int4_weight_xnnpack"]["float_layers"] == int4.float_layers
    assert manifest["meta"]["float_layers"]["executorch-int4"] == int4.float_layers
    assert [(str(a.target), a.granularity) for a in result.sensitivity] == [
        ("int4_weight:xnnpack", "block"), ("int8_dynamic:x86", "block"),
    ]  # fmt: skip
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Quantization sensitivity" in report and "### int4_weight:xnnpack, per block" in report
    assert (tmp_path / "report" / "sensitivity_int4_weight_xnnpack_block.png").stat().st_size > 1000
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["sensitivity"][0]["units"][0]["unit"] == int4.plan.sensitivity.ranking()[0]
