"""Export engine: every format is written, loaded back in its own runtime and checked on real digit images."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pqv_lightning import export as ex
from pqv_lightning.quantization import QuantizationTarget, QuantizedModel, quantize
from pqv_lightning.utils.io import atomic_write

BATCH = 8  # export batch; the 540 held-out images leave a short last piece, so padding is exercised


@pytest.fixture(scope="module")
def data(digit_tensors):
    x, xv, yv = digit_tensors["x_train"], digit_tensors["x_heldout"], digit_tensors["y_heldout"]
    val = [(xv[i : i + 64], yv[i : i + 64]) for i in range(0, len(xv), 64)]
    calibration = [x[i : i + 64] for i in range(0, 256, 64)]
    return x[:BATCH].clone(), val, calibration


@pytest.fixture(scope="module")
def eager_top1(trained_tiny_vit, data):
    _, val, _ = data
    with torch.no_grad():
        correct = sum((trained_tiny_vit(x).argmax(1) == y).sum().item() for x, y in val)
    return correct / sum(len(y) for _, y in val)


@pytest.fixture(scope="module")
def quantized(trained_tiny_vit, data):
    example, _, calibration = data
    targets = ["fp16", "int8_dynamic:x86", "int8_static:x86", "int4_weight"]
    return [quantize(trained_tiny_vit, t, example, calibration) for t in targets]


@pytest.fixture(scope="module")
def exported(trained_tiny_vit, data, quantized, tmp_path_factory):
    example, val, calibration = data
    out = tmp_path_factory.mktemp("export")
    records = ex.export_artifacts(
        trained_tiny_vit,
        out,
        ["torchscript", "lite", "onnx"],
        example,
        val,
        quantized=quantized,
        calibration=calibration,
        onnx_precisions=("fp32", "int8", "int8_qdq"),
    )
    return out, records


def _by_name(records):
    return {r.name: r for r in records}


def test_torchscript_lite_onnx_export_and_verify(exported, eager_top1):
    out, records = exported
    recs = _by_name(records)
    expected_ok = [
        f"{fmt}-{tag}"
        for fmt in ("torchscript", "lite")
        for tag in ("fp32", "fp16", "int8_dynamic_x86", "int8_static_x86")
    ] + ["onnx-fp32", "onnx-int8", "onnx-int8_qdq"]
    for name in expected_ok:
        rec = recs[name]
        assert rec.status == "ok", (name, rec.reason)
        assert rec.input_shape == [BATCH, 1, 16, 16]
        assert rec.extra["verified_images"] == 540
        path = Path(rec.path)
        assert path.parent == out and path.stat().st_size == rec.size_bytes
        if rec.precision == "fp32":
            assert rec.top1_agreement == 1.0 and rec.max_abs_logit_diff < 1e-3
            assert rec.val_top1 == pytest.approx(eager_top1)
        else:
            assert rec.top1_agreement >= 0.97
            assert abs(rec.val_top1 - eager_top1) <= 0.03
        assert rec.val_top5 >= rec.val_top1
    assert eager_top1 > 0.8
    for tag in (
        "fp16",
        "int8_dynamic_x86",
        "int8_static_x86",
    ):  # serialisation is faithful to the eager variant
        assert recs[f"torchscript-{tag}"].extra["eager_variant_top1_agreement"] >= 0.99
    for fmt in ("torchscript", "lite"):  # int4 (torchao tensor subclasses) has no TorchScript form
        rec = recs[f"{fmt}-int4_weight_xnnpack"]
        assert rec.status == "skipped" and "not TorchScript-able" in rec.reason and rec.path is None
    assert recs["onnx-int8"].extra["per_channel"] is True
    assert recs["onnx-fp32"].extra["onnx_exporter"] == "dynamo"
    # optimize_for_mobile is recorded plainly on every lite file
    status = ex.optimize_for_mobile_status()
    for rec in records:
        if rec.format == "lite" and rec.status == "ok":
            assert rec.extra["optimize_for_mobile"] == (status or "applied")
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def _agreement_and_diff(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return (logits.argmax(1) == ref.argmax(1)).float().mean().item(), (logits - ref).abs().max().item()


def test_files_load_in_their_own_runtime_independently(exported, trained_tiny_vit, data):
    """Reload with plain runtime APIs (no project code) and compare with the eager model."""
    import onnxruntime as ort
    from torch.jit.mobile import _load_for_lite_interpreter

    _, records = exported
    _, val, _ = data
    images = torch.cat([x for x, _ in val])[:296]  # a multiple of the export batch
    with torch.no_grad():
        ref = trained_tiny_vit(images)
    checked = set()
    for rec in records:
        if rec.status != "ok":
            continue
        if rec.format == "onnx":
            session = ort.InferenceSession(rec.path, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            chunks = [session.run(None, {name: c.numpy()})[0] for c in images.split(BATCH)]
            logits = torch.from_numpy(np.concatenate(chunks))
        else:
            previous = torch.backends.quantized.engine
            torch.backends.quantized.engine = "x86"  # the int8 variants were packed for x86
            try:
                load = torch.jit.load if rec.format == "torchscript" else _load_for_lite_interpreter
                module = load(rec.path)
                with torch.no_grad():
                    logits = torch.cat([module(c) for c in images.split(BATCH)])
            finally:
                torch.backends.quantized.engine = previous
        agreement, diff = _agreement_and_diff(logits.float(), ref)
        if rec.precision == "fp32":
            assert agreement == 1.0 and diff < 1e-3, rec.name
        else:
            assert agreement >= 0.97, rec.name
        checked.add(rec.format)
    assert checked == {"torchscript", "lite", "onnx"}


def test_manifest_is_json_with_matching_checksums(exported, tmp_path):
    out, records = exported
    manifest = out / "manifest.json"
    ex.write_manifest(records, manifest, {"model": "vit_tiny_patch16_224", "dataset": "sklearn digits"})
    doc = json.loads(manifest.read_text())
    assert doc["meta"]["dataset"] == "sklearn digits"
    assert doc["environment"]["torch"] == torch.__version__.split("+")[0]
    assert len(doc["artifacts"]) == len(records)
    for row in doc["artifacts"]:
        assert set(row) >= {
            "name",
            "format",
            "precision",
            "backend",
            "path",
            "size_bytes",
            "sha256",
            "status",
        }
        if row["status"] == "skipped":
            assert row["sha256"] is None and row["reason"]
            continue
        file = out / row["path"]  # stored relative to the manifest's folder
        data = file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["size_bytes"]
        assert "traceback" not in row["extra"]


def test_failure_in_one_format_is_recorded_and_others_go_on(trained_tiny_vit, data, tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    example, val, _ = data
    (tmp_path / "model_fp32.onnx").write_bytes(b"left by an earlier run")
    records = ex.export_artifacts(
        trained_tiny_vit, tmp_path, ["onnx", "torchscript"], example, val[:2], onnx_precisions=("fp32", "int8")
    )
    recs = _by_name(records)
    for name in ("onnx-fp32", "onnx-int8"):
        assert recs[name].status == "failed"
        assert recs[name].reason.startswith("export failed: RuntimeError: exporter exploded")
        assert not (tmp_path / f"model_{name[5:]}.onnx").exists()
    assert recs["onnx-fp32"].extra["removed_stale_file"] == "model_fp32.onnx"
    assert recs["torchscript-fp32"].status == "ok" and recs["torchscript-fp32"].top1_agreement == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_fp32.pt"]


def test_onnx_falls_back_to_legacy_exporter_with_reason(trained_tiny_vit, data, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo unavailable")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    example, val, _ = data
    (rec,) = ex.export_artifacts(trained_tiny_vit, tmp_path, ["onnx"], example, val[:2], onnx_precisions=("fp32",))
    assert rec.status == "ok", rec.reason
    assert rec.extra["onnx_exporter"].startswith("legacy")
    assert "dynamo unavailable" in rec.extra["dynamo_failed"]
    assert rec.top1_agreement == 1.0


def test_verification_failure_marks_record_and_keeps_file(trained_tiny_vit, data, tmp_path, tiny_vit_kwargs):
    """A variant whose outputs do not match the eager float model is exported but marked failed."""
    example, val, _ = data
    torch.manual_seed(1)
    untrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs)
    wrong = QuantizedModel(QuantizationTarget("fp16"), untrained.eval())  # disagrees with the trained model
    records = ex.export_artifacts(trained_tiny_vit, tmp_path, ["torchscript"], example, val[:2], quantized=[wrong])
    recs = _by_name(records)
    assert recs["torchscript-fp32"].status == "ok"
    bad = recs["torchscript-fp16"]
    assert bad.status == "failed" and bad.reason.startswith("verification failed: top-1 agreement")
    assert bad.top1_agreement < 0.97
    assert Path(bad.path).is_file() and bad.sha256 is not None
    strict = ex.VerifyThresholds(fp32_min_agreement=1.0, fp32_max_abs_diff=1e-12)
    (rec,) = ex.export_artifacts(
        trained_tiny_vit, tmp_path, ["onnx"], example, val[:1], onnx_precisions=("fp32",), thresholds=strict
    )
    if rec.max_abs_logit_diff > 1e-12:
        assert rec.status == "failed" and "max |logit diff|" in rec.reason


@pytest.fixture
def no_export_work(monkeypatch):
    """Make any export step raise, to prove validation happens before export work starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("export work started before input validation")

    monkeypatch.setattr(torch.jit, "script", forbidden)
    monkeypatch.setattr(torch.jit, "trace", forbidden)
    monkeypatch.setattr(torch.onnx, "export", forbidden)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"formats": ["onnx", "tflite"]},
            ValueError,
            "'tflite'.*accepted: torchscript, lite, executorch, onnx",
        ),
        (
            {"example_input": torch.zeros(1, 16, 16)},
            ValueError,
            r"example_input=<3-D tensor of shape \[1, 16, 16\], dtype torch\.float32> is invalid; accepted: a 4-D",
        ),
        ({"example_input": torch.zeros(1, 1, 16, 16, dtype=torch.long)}, ValueError, "float tensor"),
        ({"onnx_precisions": ("fp32", "int2")}, ValueError, r"onnx_precisions\[1\]='int2' is invalid; accepted: fp32"),
        ({"executorch_precisions": ("int3",), "formats": ["executorch"]}, ValueError, "'int3'"),
        ({"formats": ["executorch"], "executorch_precisions": ("int8",)}, ValueError, "need calibration"),
        ({"val_batches": []}, ValueError, r"val_batches=\[\] is invalid; accepted: one or more \(images, labels\)"),
    ],
)
def test_bad_input_fails_before_any_export_work(
    trained_tiny_vit, data, tmp_path, no_export_work, kwargs, error, message
):
    example, val, _ = data
    args = {"formats": ["torchscript", "onnx"], "example_input": example, "val_batches": val[:1]} | kwargs
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        ex.export_artifacts(trained_tiny_vit, out, **args)
    assert not out.exists()


def test_unwritable_output_dir_fails_fast(trained_tiny_vit, data, tmp_path, no_export_work):
    example, val, _ = data
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        ex.export_artifacts(trained_tiny_vit, blocker / "out", ["torchscript"], example, val[:1])
    with pytest.raises(NotADirectoryError, match="not a directory"):
        ex.check_output_dir(blocker)
    assert ex.check_output_dir(tmp_path / "new" / "dir").is_dir()


def test_validate_formats():
    assert ex.validate_formats(["onnx", "lite", "onnx"]) == ("onnx", "lite")
    assert ex.validate_formats("executorch") == ("executorch",)
    with pytest.raises(ValueError, match=r"formats=\[\] is invalid; accepted: one or more of torchscript"):
        ex.validate_formats([])


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_optimize_for_mobile_probe_is_cached_and_logged_once(caplog):
    ex.optimize_for_mobile_status.cache_clear()
    with caplog.at_level(logging.WARNING, logger="pqv_lightning.export"):
        first = ex.optimize_for_mobile_status()
        second = ex.optimize_for_mobile_status()
    assert first == second
    if torch._C._is_xnnpack_enabled():
        assert first is None
    else:
        assert first.startswith("unavailable") and "XNNPACK" in first
        assert sum("optimize_for_mobile" in r.message for r in caplog.records) == 1


@pytest.mark.slow
def test_executorch_exports_verify_and_run_independently(trained_tiny_vit, data, tmp_path):
    from executorch.runtime import Runtime

    example, val, calibration = data
    records = ex.export_artifacts(
        trained_tiny_vit, tmp_path, ["executorch"], example, val, calibration=calibration,
        executorch_precisions=("fp32", "int8", "int4"),
    )  # fmt: skip
    assert [r.name for r in records] == ["executorch-fp32", "executorch-int8", "executorch-int4"]
    images = torch.cat([x for x, _ in val])[:96]
    with torch.no_grad():
        ref = trained_tiny_vit(images)
    runtime = Runtime.get()
    for rec in records:
        assert rec.status == "ok", (rec.name, rec.reason)
        assert rec.extra["delegated_nodes"] > 0 and isinstance(rec.extra["outside_ops"], dict)
        forward = runtime.load_program(Path(rec.path)).load_method("forward")
        logits = torch.cat([forward.execute([c.contiguous()])[0] for c in images.split(BATCH)])
        agreement, diff = _agreement_and_diff(logits, ref)
        if rec.precision == "fp32":
            assert rec.top1_agreement == 1.0 and agreement == 1.0 and diff < 1e-3
        else:
            assert rec.top1_agreement >= 0.97 and agreement >= 0.95
