"""The fit-end chain and the shape-change base together: resume keeps the pruning result, SparsityGates feeds
distillation and the report like StructuredPruning does, and the callback order changes nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import pqv_lightning.callbacks.fit_end as fit_end
from pqv_lightning.callbacks import (
    KnowledgeDistillation,
    MobileExport,
    Quantization,
    SparsityGates,
    StructuredPruning,
    TradeoffReport,
)
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.quantization import evaluate

pytestmark = pytest.mark.slow

QUICK_REPORT = {"memory": False, "runs": 3, "warmup": 1, "batch": None, "profile": None}


def _trainer(root: Path, epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        limit_train_batches=4,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def _digits() -> DigitsDataModule:
    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32, augment=False)


def _callback_state(checkpoint: dict, cls: type) -> dict:
    states = [v for k, v in checkpoint["callbacks"].items() if k.startswith(cls.__name__)]
    assert len(states) == 1, list(checkpoint["callbacks"])
    return states[0]


def test_resume_past_the_pruning_epoch_keeps_the_pruning_summary(tmp_path, trained_classifier):
    first = ModelCheckpoint(dirpath=tmp_path / "first", save_last=True)
    pruning = StructuredPruning(ratio=0.25, at_epoch=1)
    _trainer(tmp_path, 2, [pruning, first]).fit(trained_classifier(), _digits())
    saved = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    summary = _callback_state(saved, StructuredPruning)["summary"]
    assert summary["ratio"] == 0.25 and summary["params_after"] < summary["params_before"]

    resumed_pruning = StructuredPruning(ratio=0.25, at_epoch=1)
    report = TradeoffReport(output_dir=tmp_path / "report", **QUICK_REPORT)
    final = ModelCheckpoint(dirpath=tmp_path / "final", save_last=True)
    trainer = _trainer(tmp_path, 3, [resumed_pruning, report, final])
    trainer.fit(trained_classifier(), _digits(), ckpt_path=tmp_path / "first" / "last.ckpt")
    assert resumed_pruning.result is None  # nothing was pruned again: the structure came from the checkpoint
    assert resumed_pruning.summary == summary
    last = torch.load(tmp_path / "final" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2
    assert _callback_state(last, StructuredPruning)["summary"] == summary
    meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert meta["pruning"].startswith("l2 importance, ratio 0.25: params ")
    assert "pruned" in {p.network for p in report.points}


class KeepModelBeforeChange(pl.Callback):
    """Subscribes to the shape-changing callback's event like distillation and the report do."""

    def setup(self, trainer, pl_module, stage) -> None:
        changer = next(cb for cb in trainer.callbacks if isinstance(cb, SparsityGates))
        changer.before_shape_change.subscribe(lambda model: setattr(self, "model", copy.deepcopy(model)))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.at_fit_start = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_sparsity_gates_give_distillation_and_the_report_the_model_before_pruning(tmp_path, trained_classifier):
    gates = SparsityGates(ratio=0.25, prune_epoch=1, l1_lambda=1e-3)
    kd = KnowledgeDistillation()
    report = TradeoffReport(output_dir=tmp_path / "report", **QUICK_REPORT)
    probe = KeepModelBeforeChange()
    module = trained_classifier()
    _trainer(tmp_path, 2, [report, kd, gates, probe]).fit(module, _digits())
    before = probe.model
    assert not any("pqv_gate" in name for name in before.state_dict())  # gates folded: a plain dense network
    teacher = kd.teacher.state_dict()
    assert set(teacher) == set(before.state_dict())
    assert all(torch.equal(teacher[k].cpu(), v) for k, v in before.state_dict().items())
    # the teacher is the model after the gated epoch, not the model at fit start
    start = {k: v for k, v in probe.at_fit_start.items() if "pqv_gate" not in k}
    assert any(not torch.equal(start[k], v) for k, v in before.state_dict().items())

    dense = next(p for p in report.points if p.network == "dense")
    assert dense.params == sum(p.numel() for p in before.parameters())
    assert dense.top1 == pytest.approx(evaluate(before, _digits_val())["top1"] / 100)
    meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert meta["pruning"].startswith("VTP sparsity gates") and "the dense model" in meta["distillation"]


def _digits_val():
    data = _digits()
    data.setup("fit")
    return list(data.val_dataloader())


def _fit_end_run(tmp_path: Path, trained_classifier, order: list[str], monkeypatch) -> tuple[dict, list, int]:
    calls = []
    real = fit_end.run_pipeline
    monkeypatch.setattr(fit_end, "run_pipeline", lambda *a, **k: calls.append(1) or real(*a, **k))
    stages = {
        "quantization": Quantization(["int8_dynamic:x86", "fp16"], calibration_batches=1),
        "export": MobileExport(
            formats=["torchscript", "onnx"],
            onnx_precisions=["fp32", "int8"],
            val_batches=2,
            output_dir=tmp_path / "artifacts",
        ),
        "report": TradeoffReport(output_dir=tmp_path / "report", **QUICK_REPORT),
    }
    pl.seed_everything(0)
    callbacks = [StructuredPruning(ratio=0.25), *(stages[name] for name in order)]
    _trainer(tmp_path, 1, callbacks).fit(trained_classifier(), _digits())
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    # TorchScript archives carry a random serialization id: their size must agree, ONNX files byte for byte
    artifacts = {
        a["name"]: (a["status"], a["sha256"] if a["format"] == "onnx" else a["size_bytes"])
        for a in manifest["artifacts"]
    }
    rows = [(p.name, p.network, p.runtime, p.status) for p in stages["report"].points]
    return artifacts, rows, len(calls)


def test_callback_order_changes_nothing(tmp_path, trained_classifier, monkeypatch):
    forward = _fit_end_run(tmp_path / "a", trained_classifier, ["quantization", "export", "report"], monkeypatch)
    backward = _fit_end_run(tmp_path / "b", trained_classifier, ["report", "export", "quantization"], monkeypatch)
    assert forward[2] == backward[2] == 1  # the chain ran once per fit
    assert forward[0] == backward[0]  # the same files
    assert {status for status, _ in forward[0].values()} == {"ok"}
    assert forward[1] == backward[1]
    assert {name for name, *_ in forward[1]} >= {"dense fp32 eager", "pruned fp32 eager", "onnx-int8"}


class Score(pl.Callback):
    """Logs a chosen validation score per epoch, so which checkpoint is best is known in advance."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("val/score", self.scores[trainer.current_epoch])


@pytest.mark.parametrize("weights", ["best", "last"])
def test_the_best_checkpoint_of_the_final_network_ships(tmp_path, trained_classifier, weights):
    """Epoch 0 (dense) scores best overall, but pruning at its end makes it another network: of the pruned
    epochs 1-3, epoch 2 is best, and that is what is quantized, exported and reported (unless weights='last')."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_top_k=4)
    export = MobileExport(formats=["onnx"], onnx_precisions=["fp32"], val_batches=1, output_dir=tmp_path / "out")
    callbacks = [Score([0.95, 0.6, 0.9, 0.7]), StructuredPruning(ratio=0.25, at_epoch=1), checkpoint, export]
    report = TradeoffReport(output_dir=tmp_path / "report", weights=weights, **QUICK_REPORT)
    module = trained_classifier()
    _trainer(tmp_path, 4, [*callbacks, report]).fit(module, _digits())
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())["meta"]
    exported = onnxruntime_logits(tmp_path / "out" / "model_fp32.onnx")
    if weights == "last":
        assert meta["weights"]["weights"] == "last" and "asked for" in meta["weights"]["why"]
        expected = module.model
    else:
        assert meta["weights"]["weights"] == "best" and meta["weights"]["epoch"] == 2
        assert meta["weights"]["score"] == pytest.approx(0.9) and "epoch=2" in meta["weights"]["checkpoint"]
        expected = copy.deepcopy(module.model)
        state = torch.load(meta["weights"]["checkpoint"], weights_only=True)["state_dict"]
        expected.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    images = _digits_val()[0][0][:1]
    torch.testing.assert_close(exported(images), expected.eval()(images), atol=1e-4, rtol=1e-4)
    report_meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert report_meta["weights"].startswith("best checkpoint" if weights == "best" else "weights at fit end")


def onnxruntime_logits(path: Path):
    from pqv_lightning.export import load_artifact

    return load_artifact(path, "onnx").predict
