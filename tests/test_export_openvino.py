"""OpenVINO IR (``.xml`` + ``.bin``): FP32 and NNCF INT8, verified in the OpenVINO runtime, through every face."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'pqv-lightning[openvino]')")
pytest.importorskip("nncf", reason="the openvino extra is not installed (pip install 'pqv-lightning[openvino]')")

from pqv_lightning.export import export_artifacts, load_artifact
from pqv_lightning.utils.checks import InvalidArgumentError


@pytest.fixture(scope="module")
def batches(digit_tensors) -> list:
    x, y = digit_tensors["x_heldout"][:128], digit_tensors["y_heldout"][:128]
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 128, 64)]


@pytest.fixture(scope="module")
def irs(trained_tiny_vit, batches, digit_tensors, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("openvino")
    calibration = [digit_tensors["x_train"][i : i + 32] for i in range(0, 256, 32)]
    records = export_artifacts(
        trained_tiny_vit, out, {"openvino": ["fp32", "int8"]}, batches[0][0][:1], batches, calibration=calibration
    )
    return out, {r.name: r for r in records}


def test_fp32_and_int8_irs_verify_in_the_openvino_runtime(irs, trained_tiny_vit, batches) -> None:
    _, records = irs
    assert set(records) == {"openvino-fp32", "openvino-int8"}
    for record in records.values():
        assert record.status == "ok", record.reason
        path = Path(record.path)
        assert path.suffix == ".xml" and path.with_suffix(".bin").is_file()
        # the size is the IR's, weights included, and the weights file is fingerprinted beside it
        assert record.size_bytes == path.stat().st_size + path.with_suffix(".bin").stat().st_size
        assert set(record.extra["companions"]) == {path.with_suffix(".bin").name}
        assert record.extra["inference_precision"] == "f32"
    assert records["openvino-fp32"].max_abs_logit_diff < 1e-3
    assert records["openvino-int8"].top1_agreement >= 0.97
    # int8 weights: the weights file shrinks to about a quarter
    fp32_bin = Path(records["openvino-fp32"].path).with_suffix(".bin").stat().st_size
    int8_bin = Path(records["openvino-int8"].path).with_suffix(".bin").stat().st_size
    assert int8_bin < 0.4 * fp32_bin
    x = batches[0][0][:1]
    with torch.inference_mode():
        expected = trained_tiny_vit(x)
    assert torch.allclose(load_artifact(records["openvino-fp32"].path, "openvino").predict(x), expected, atol=1e-3)


def test_an_ir_runs_in_a_process_with_neither_torch_nor_the_toolkit(irs, batches) -> None:
    out, records = irs
    x = batches[0][0][:1].numpy()
    import numpy as np

    np.save(out / "x.npy", x)
    code = (
        "import sys, numpy as np\n"
        "from pqv_lightning.export import load_artifact\n"
        f"y = load_artifact({records['openvino-int8'].path!r}, 'openvino').run(np.load({str(out / 'x.npy')!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(int(y.argmax()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = int(load_artifact(records["openvino-int8"].path, "openvino").predict(torch.from_numpy(x)).argmax())
    assert int(result.stdout.strip().splitlines()[-1]) == expected


def test_a_failed_write_leaves_neither_file(trained_tiny_vit, batches, tmp_path, monkeypatch) -> None:
    from pqv_lightning.export import openvino

    (tmp_path / "model_fp32.bin").write_bytes(b"stale weights of another model")

    def broken(ov_model, path):
        raise OSError("disk full")

    monkeypatch.setattr(openvino, "_save", broken)
    (record,) = export_artifacts(trained_tiny_vit, tmp_path, {"openvino": ["fp32"]}, batches[0][0][:1], batches[:1])
    assert record.status == "failed" and "disk full" in record.reason
    assert not list(tmp_path.glob("model_fp32.*"))  # the stale weights of another model are gone too


def test_int8_needs_calibration_and_a_missing_extra_is_refused_before_work(
    trained_tiny_vit, batches, tmp_path, monkeypatch
) -> None:
    import importlib.util

    x = batches[0][0][:1]
    with pytest.raises(InvalidArgumentError, match="openvino int8 need calibration"):
        export_artifacts(trained_tiny_vit, tmp_path, {"openvino": ["int8"]}, x, batches[:1])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(InvalidArgumentError, match=r"nncf is not installed.*pqv-lightning\[openvino\]"):
        export_artifacts(trained_tiny_vit, tmp_path, {"openvino": ["int8"]}, x, batches[:1], calibration=[x])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_mobile_export_and_the_report_measure_the_irs(tmp_path, trained_classifier, capture_logger) -> None:
    import lightning.pytorch as pl

    from pqv_lightning.callbacks import MobileExport, TradeoffReport
    from pqv_lightning.datamodules import DigitsDataModule

    export = MobileExport(artifacts={"openvino": ["fp32", "int8"]}, val_batches=2, calibration_batches=4)
    report = TradeoffReport(threads=1, warmup=2, runs=5, batch=None, memory=False, profile=None, val_batches=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=2,
        logger=capture_logger(str(tmp_path)), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[export, report], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(trained_classifier(), DigitsDataModule(img_size=16, in_chans=1, batch_size=32))
    assert [r.status for r in export.records] == ["ok", "ok"], [r.reason for r in export.records]
    manifest = json.loads(Path(export.manifest_path).read_text())
    assert manifest["meta"]["artifacts"] == {"openvino": ["fp32", "int8"]}
    rows = {p.name: p for p in report.points}
    for name in ("openvino-fp32", "openvino-int8"):
        assert rows[name].runtime == "openvino" and rows[name].latency_ms > 0 and rows[name].size_bytes > 0
    assert "openvino-int8" in Path(report.files["markdown"]).read_text()


@pytest.mark.slow
def test_pqv_export_writes_the_irs_of_a_checkpoint(tmp_path, trained_classifier) -> None:
    import lightning.pytorch as pl

    from pqv_lightning.apps.export_checkpoint import main
    from pqv_lightning.datamodules import DigitsDataModule

    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(trained_classifier(), DigitsDataModule(img_size=16, in_chans=1, batch_size=32))
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    status = main(
        ["--checkpoint", str(checkpoint), "--artifacts", "openvino=fp32", "--output-dir", str(tmp_path / "out"),
         "--val-batches", "2"]
    )  # fmt: skip
    assert status == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(a["name"], a["status"]) for a in manifest["artifacts"]] == [("openvino-fp32", "ok")]
