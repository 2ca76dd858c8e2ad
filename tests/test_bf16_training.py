"""Finetuning under ``precision="bf16-mixed"`` (Lightning runs it on CPU): pruning at epoch K, sparsity gates
and distillation work under autocast, and quantization and export see the fp32 model (issue 15, item 13)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

PRUNE_AND_DISTIL = """
                - class_path: pqv_lightning.callbacks.StructuredPruning
                  init_args: {ratio: 0.25, importance: taylor, calibration_batches: 2, at_epoch: 1}
                - class_path: pqv_lightning.callbacks.KnowledgeDistillation
                - class_path: pqv_lightning.callbacks.Quantization
                  init_args: {targets: [int8_dynamic:x86, fp16], calibration_batches: 1}
                - class_path: pqv_lightning.callbacks.MobileExport
                  init_args: {formats: [onnx], onnx_precisions: [fp32, int8], val_batches: 2}"""
GATES = """
                - class_path: pqv_lightning.callbacks.SparsityGates
                  init_args: {ratio: 0.25, prune_epoch: 1, l1_lambda: 1.0e-3}
                - class_path: pqv_lightning.callbacks.KnowledgeDistillation
                - class_path: pqv_lightning.callbacks.MobileExport
                  init_args: {formats: [onnx], onnx_precisions: [fp32], val_batches: 2}"""


@pytest.mark.parametrize("callbacks", [PRUNE_AND_DISTIL, GATES], ids=["pruning+kd", "gates+kd"])
def test_bf16_mixed_finetune_prunes_distils_and_exports_fp32(tmp_path, cli, cli_config, callbacks):
    result = cli(["fit", "--config", str(cli_config(tmp_path, callbacks)), "--trainer.precision=bf16-mixed"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bfloat16 Automatic Mixed Precision" in result.stdout + result.stderr  # it did train under autocast
    run = tmp_path / "runs" / "test" / "version_0"
    manifest = json.loads((run / "artifacts" / "manifest.json").read_text())
    assert manifest["meta"]["pruned"] is True
    statuses = {a["name"]: a["status"] for a in manifest["artifacts"]}
    assert statuses and set(statuses.values()) == {"ok"}, statuses
    fp32 = next(a for a in manifest["artifacts"] if a["name"] == "onnx-fp32")
    assert fp32["max_abs_logit_diff"] < 1e-3  # the exported graph is the fp32 model, not a bf16 one
    assert "distillation" in {p.parent.name for p in run.rglob("teacher-*.pt")}
    if "Quantization" in callbacks:
        assert set(manifest["meta"]["quantization"]["variants"]) == {"int8_dynamic_x86", "fp16"}
