"""``MobileExport`` after ``Quantization`` at fit end, and ``pqv-export`` on saved checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pqv_lightning import ViTClassifier
from pqv_lightning.apps.export_checkpoint import main as export_main
from pqv_lightning.callbacks.export import MobileExport
from pqv_lightning.callbacks.fit_end import FitEndIncompleteError
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.quantization import Quantization
from pqv_lightning.datamodules import DigitsDataModule


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class SnapshotAtFitEnd(pl.Callback):
    """Listed first: hashes the checkpoint files and copies the weights before the export callbacks run."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = checkpoint_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        self.hashes = _hashes(self.checkpoint_dir)
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class _CountSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def _digits() -> DigitsDataModule:
    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32, augment=False)


def _trainer(callbacks, logger, root, epochs=1, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, trained_classifier, capture_logger):
    """MobileExport listed BEFORE Quantization; default output dir; checkpoints written during the fit."""
    root = tmp_path_factory.mktemp("fit")
    checkpoint_dir = root / "checkpoints"
    logger = capture_logger(str(root / "logs"))
    snapshot = SnapshotAtFitEnd(checkpoint_dir)
    export = MobileExport(formats=["torchscript", "onnx"], onnx_precisions=["fp32", "int8"], batch_size=8)
    quant = Quantization(["int8_dynamic:x86", "fp16", "int4_weight"], calibration_batches=2)
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, monitor="val/top1", mode="max")
    trainer = _trainer([snapshot, export, quant, checkpoint], logger, root, epochs=1)
    module = trained_classifier()
    trainer.fit(module, _digits())
    return trainer, module, export, quant, logger, snapshot, checkpoint_dir


def test_export_runs_after_quantization_whatever_the_callback_order(fitted):
    _, _, export, quant, _, _, _ = fitted
    assert export.error is None
    assert len(quant.quantized_models) == 3
    records = {r.name: r for r in export.records}
    for name in ("torchscript-fp32", "torchscript-int8_dynamic_x86", "torchscript-fp16", "onnx-fp32", "onnx-int8"):
        assert records[name].status == "ok", (name, records[name].reason)
        assert records[name].top1_agreement >= 0.97
    assert records["torchscript-int4_weight_xnnpack"].status == "skipped"  # not TorchScript-able, says so
    assert "not TorchScript-able" in records["torchscript-int4_weight_xnnpack"].reason
    assert records["torchscript-fp32"].max_abs_logit_diff < 1e-3


def test_manifest_lists_every_artifact_with_status_and_parity(fitted):
    trainer, _, export, quant, _, _, _ = fitted
    assert export.manifest_path == Path(trainer.log_dir) / "artifacts" / "manifest.json"  # default output dir
    doc = json.loads(export.manifest_path.read_text())
    rows = {(a["format"], a["precision"], a["backend"]): a for a in doc["artifacts"]}
    wanted = {
        ("torchscript", "fp32", "cpu"),
        ("torchscript", "int8", "x86"),
        ("torchscript", "fp16", "none"),
        ("onnx", "fp32", "onnxruntime-cpu"),
        ("onnx", "int8", "onnxruntime-cpu"),
    }
    assert wanted <= set(rows)
    for key in wanted:
        row = rows[key]
        assert row["status"] == "ok"
        file = export.manifest_path.parent / row["path"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == row["sha256"]
        assert 0.97 <= row["top1_agreement"] <= 1.0 and row["max_abs_logit_diff"] is not None
        assert row["extra"]["verified_images"] == 270  # the whole digits validation split
    variants = doc["meta"]["quantization"]["variants"]
    assert set(variants) == {"int8_dynamic_x86", "fp16", "int4_weight_xnnpack"}
    assert variants["fp16"]["top1"] == pytest.approx(quant.results[1].top1)
    assert doc["meta"]["quantization"]["float"]["top1"] == pytest.approx(quant.float_metrics["top1"])
    # verification accuracy comes from the runtime's outputs and matches the eager evaluation
    assert rows[("torchscript", "fp32", "cpu")]["val_top1"] == pytest.approx(quant.float_metrics["top1"])


def test_training_checkpoints_and_model_are_untouched(fitted):
    _, module, _, _, _, snapshot, checkpoint_dir = fitted
    assert {"last.ckpt"} < set(snapshot.hashes)
    assert _hashes(checkpoint_dir) == snapshot.hashes
    after = module.state_dict()
    assert after.keys() == snapshot.state.keys()
    assert all(torch.equal(after[k], v) for k, v in snapshot.state.items())
    assert isinstance(module.model.blocks[0].attn.qkv, torch.nn.Linear)


def test_summary_and_quantization_metrics_logged(fitted):
    _, _, export, _, logger, _, _ = fitted
    assert logger.metrics["export/ok"] == sum(r.status == "ok" for r in export.records)
    assert logger.metrics["export/failed"] == 0
    assert "| torchscript-int8_dynamic_x86 | torchscript | int8 | ok |" in logger.texts["export/artifacts"]
    assert "quantization/int8_dynamic_x86/top1" in logger.metrics
    assert "| int4_weight_xnnpack |" in logger.texts["quantization/results"]


def test_a_failed_export_is_recorded_without_raising(tmp_path, monkeypatch, trained_classifier):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr("pqv_lightning.pipeline.export.export_artifacts", broken)
    export = MobileExport(
        formats=["onnx"], onnx_precisions=["fp32"], output_dir=tmp_path / "out", val_batches=1, on_failure="warn"
    )
    trainer = _trainer([export], False, tmp_path, epochs=1, limit_train_batches=2, limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"fit-end chain fell short \(export: no verified file: .*simulated"):
        trainer.fit(trained_classifier(), _digits())
    assert "simulated exporter crash" in export.error
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["meta"]["error"] == export.error


def test_an_export_that_produced_nothing_fails_the_fit_after_saving_everything(tmp_path, trained_classifier):
    """The folder becomes unwritable mid-fit (replaced by a file: permissions do not stop root): nothing is
    exported; the checkpoint is kept and the fit ends with the reason in one line."""
    out = tmp_path / "out"

    class BreakFolder(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            shutil.rmtree(out)
            out.write_text("not a folder any more")

    export = MobileExport(formats=["onnx"], onnx_precisions=["fp32"], output_dir=out, val_batches=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer([BreakFolder(), export, checkpoint], False, tmp_path, epochs=1, limit_train_batches=2)
    with pytest.raises(FitEndIncompleteError, match=r"export: no verified file: .*ckpt are untouched"):
        trainer.fit(trained_classifier(), _digits())
    assert out.read_text() == "not a folder any more"
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"formats": ["tflite"]}, r"formats\[0\]='tflite' is invalid; accepted: torchscript, lite, executorch, onnx"),
        ({"executorch_precisions": ["int2"]}, r"executorch_precisions\[0\]='int2' is invalid; accepted: fp32, int8"),
        ({"onnx_precisions": ["fp8"]}, r"onnx_precisions\[0\]='fp8' is invalid; accepted: fp32, int8, int8_qdq"),
        ({"batch_size": 0}, r"batch_size=0 is invalid; accepted: an int >= 1"),
        ({"val_batches": 0}, r"val_batches=0 is invalid; accepted: None or an int >= 1"),
        (
            {"calibration_batches": 0},
            r"calibration_batches=0 is invalid; accepted: an int >= 1, because executorch",
        ),
        ({"calibration_split": "test"}, r"calibration_split='test' is invalid"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MobileExport(**kwargs)


def test_unwritable_output_dir_fails_before_training(tmp_path, trained_classifier):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    counter = _CountSteps()
    export = MobileExport(formats=["onnx"], output_dir=blocker / "artifacts")
    trainer = _trainer([export, counter], False, tmp_path, epochs=1)
    with pytest.raises(PermissionError, match=r"export output dir .*a_file/artifacts.* is not writable"):
        trainer.fit(trained_classifier(), _digits())
    assert counter.steps == 0


# --------------------------------------------------------------------------- pqv-export (no training)


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory, trained_classifier) -> Path:
    root = tmp_path_factory.mktemp("pruned")
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    trainer = _trainer([StructuredPruning(ratio=0.25), checkpoint], False, root, epochs=2)
    trainer.fit(trained_classifier(), _digits())
    return root / "last.ckpt"


def test_pqv_export_on_a_pruned_checkpoint(pruned_checkpoint, tmp_path, capsys):
    before = hashlib.sha256(pruned_checkpoint.read_bytes()).hexdigest()
    out = tmp_path / "exported"
    argv = ["--checkpoint", str(pruned_checkpoint), "--quantize", "int8_dynamic:x86,fp16"]
    argv += ["--formats", "torchscript", "onnx", "--onnx-precisions", "fp32", "--output-dir", str(out)]
    argv += ["--batch-size", "4", "--val-batches", "3"]
    assert export_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| int8_dynamic_x86 |" in printed and "manifest:" in printed
    doc = json.loads((out / "manifest.json").read_text())
    rows = {a["name"]: a for a in doc["artifacts"]}
    assert set(rows) == {"torchscript-fp32", "torchscript-int8_dynamic_x86", "torchscript-fp16", "onnx-fp32"}
    assert all(row["status"] == "ok" and row["extra"]["verified_images"] == 3 * 64 for row in rows.values())
    assert doc["meta"]["checkpoint"] == str(pruned_checkpoint.resolve())
    assert doc["meta"]["pruned"] is True
    pruned = ViTClassifier.from_checkpoint(pruned_checkpoint).model
    assert doc["meta"]["parameters"] == sum(p.numel() for p in pruned.parameters())
    loaded = torch.jit.load(str(out / rows["torchscript-fp32"]["path"]))
    images = next(iter(_digits().val_dataloader()))[0][:4]
    assert torch.allclose(loaded(images), pruned.eval()(images), atol=1e-4)
    assert hashlib.sha256(pruned_checkpoint.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is a text file", "cannot be read as a weights-only torch file"),
        ({"weight": torch.zeros(2)}, "it has no 'state_dict'"),
        ({"state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, "lack"),
    ],
)
def test_pqv_export_rejects_a_file_that_is_not_a_pqv_checkpoint(content, match, tmp_path, capsys):
    path = tmp_path / "foreign.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(path), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "is not a pqv-lightning checkpoint" in err and match in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_pqv_export_argument_errors_and_help(tmp_path, capsys):
    for argv, match in (
        (["--formats", "tflite"], "formats[0]='tflite' is invalid; accepted: torchscript, lite"),
        (["--quantize", "int8_dynamic:armv7"], "backend='armv7' is invalid"),
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "missing.ckpt' does not exist"),
    ):
        if "--checkpoint" not in argv:
            argv = ["--checkpoint", str(tmp_path / "missing.ckpt"), *argv]
        with pytest.raises(SystemExit) as exit_info:
            export_main(argv)
        assert exit_info.value.code == 2
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    assert exit_info.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


@pytest.mark.slow
def test_every_format_and_precision_at_fit_end(tmp_path, trained_classifier):
    export = MobileExport(
        output_dir=tmp_path / "all",
        executorch_precisions=["fp32", "int8", "int8_dynamic", "int4"],
        onnx_precisions=["fp32", "int8", "int8_qdq"],
        calibration_batches=4,
        batch_size=8,
        val_batches=2,  # 64 images x 14 artifacts keeps this test near a minute
    )
    quant = Quantization(["int8_dynamic:x86", "int8_static:x86", "int8_pt2e:xnnpack", "fp16"], calibration_batches=4)
    trainer = _trainer([export, quant], False, tmp_path, epochs=1, enable_checkpointing=False)
    trainer.fit(trained_classifier(), _digits())
    doc = json.loads((tmp_path / "all" / "manifest.json").read_text())
    rows = {a["name"]: a for a in doc["artifacts"]}
    expected = {f"{fmt}-{tag}" for fmt in ("torchscript", "lite") for tag in ("fp32", "int8_dynamic_x86", "fp16")}
    expected |= {f"executorch-{p}" for p in ("fp32", "int8", "int8_dynamic", "int4")}
    expected |= {"onnx-fp32", "onnx-int8", "onnx-int8_qdq"}
    assert expected <= set(rows)
    for name in expected:
        assert rows[name]["status"] in ("ok", "failed"), name
        assert rows[name]["top1_agreement"] is not None, (name, rows[name]["reason"])
    for name in ("torchscript-fp32", "lite-fp32", "executorch-fp32", "onnx-fp32"):
        assert rows[name]["status"] == "ok", (name, rows[name]["reason"])
        assert rows[name]["top1_agreement"] == 1.0
    assert rows["executorch-fp32"]["extra"]["outside_ops"] == {}  # fully delegated to XNNPACK
    assert rows["lite-int8_pt2e_xnnpack"]["status"] == "skipped"


def test_a_killed_export_leaves_a_manifest_of_what_it_verified(tmp_path, monkeypatch, trained_tiny_vit, digit_tensors):
    """The manifest is rewritten (atomically) after every final record: a kill mid-export loses nothing verified."""
    import pqv_lightning.export.writer as writer
    from pqv_lightning.pipeline import ExportConfig, export_stage

    real, calls = writer.verify_outputs, []

    def killed_at_the_second_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT does mid-export
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "verify_outputs", killed_at_the_second_file)
    config = ExportConfig(formats=["onnx"], onnx_precisions=["fp32", "int8"], output_dir=tmp_path)
    val = [(digit_tensors["x_heldout"][:32], digit_tensors["y_heldout"][:32])]
    with pytest.raises(KeyboardInterrupt):
        export_stage(trained_tiny_vit, tmp_path, config, val)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["meta"]["complete"] is False
    assert [(a["name"], a["status"]) for a in doc["artifacts"]] == [("onnx-fp32", "ok")]
    assert (tmp_path / doc["artifacts"][0]["path"]).is_file()
