"""``Quantization`` callback: runs at fit end on a copy of the trained (pruned) model, logs variants side by side."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

from pqv_lightning import quantization as q_engine
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.quantization import Quantization
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.quantization import targets as q_targets


class WeightsAtFitEnd(pl.Callback):
    """Listed first: records the training model's weights before the other callbacks' ``on_fit_end``."""

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.training = pl_module.training


def _trainer(callbacks, logger, tmp_path, epochs=2, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _digits(batch_size: int = 32) -> DigitsDataModule:
    return DigitsDataModule(img_size=16, in_chans=1, batch_size=batch_size, augment=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, trained_classifier, capture_logger):
    """A pruned tiny ViT trained on digits with three quantization targets."""
    tmp = tmp_path_factory.mktemp("quant")
    logger = capture_logger()
    weights = WeightsAtFitEnd()
    quant = Quantization(["int8_dynamic:x86", "int8_static:x86", "fp16"], calibration_batches=2)
    pruning = StructuredPruning(ratio=0.25)
    module = trained_classifier()
    trainer = _trainer([weights, quant, pruning], logger, tmp, epochs=2)
    trainer.fit(module, _digits())
    return trainer, module, quant, logger, weights


def test_variants_built_and_evaluated_on_the_pruned_model(fitted):
    _, module, quant, _, _ = fitted
    assert [r.name for r in quant.results] == ["int8_dynamic_x86", "int8_static_x86", "fp16"]
    assert all(r.error is None and r.quantized is not None for r in quant.results)
    assert module.model.blocks[0].mlp.fc1.out_features < 4 * 64  # the pruned model was quantized
    assert quant.float_metrics["top1"] > 0.7  # chance is 0.1: the figures come from a trained model
    for r in quant.results:
        assert 0.0 <= r.top1 <= r.top5 <= 1.0
        assert r.top1_agreement > 0.85, r
        assert abs(r.top1 - quant.float_metrics["top1"]) < 0.1
    dynamic = quant.results[0].quantized.unwrapped()
    assert isinstance(dynamic.blocks[0].mlp.fc1, torch.ao.nn.quantized.dynamic.Linear)
    assert dynamic.blocks[0].mlp.fc1.out_features == module.model.blocks[0].mlp.fc1.out_features


def test_training_model_is_left_alone(fitted):
    _, module, _, _, weights = fitted
    after = module.state_dict()
    assert after.keys() == weights.state.keys()
    for key, value in weights.state.items():
        assert torch.equal(after[key], value), key
    assert isinstance(module.model.blocks[0].mlp.fc1, torch.nn.Linear)
    assert module.model.blocks[0].mlp.fc1.weight.dtype == torch.float32
    assert module.training == weights.training


def test_metrics_and_table_logged_side_by_side(fitted):
    _, _, quant, logger, _ = fitted
    for name in ("float", "int8_dynamic_x86", "int8_static_x86", "fp16"):
        for key in ("top1", "top5"):
            assert f"quantization/{name}/{key}" in logger.metrics
    assert logger.metrics["quantization/float/top1"] == pytest.approx(quant.float_metrics["top1"])
    assert logger.metrics["quantization/fp16/top1_agreement"] == pytest.approx(quant.results[2].top1_agreement)
    table = logger.texts["quantization/results"]
    for name in ("float", "int8_dynamic_x86", "int8_static_x86", "fp16"):
        assert f"| {name} |" in table


def test_float_metrics_match_an_independent_evaluation(fitted):
    trainer, module, quant, _, _ = fitted
    correct = total = 0
    module.eval()
    with torch.no_grad():
        for images, labels in trainer.datamodule.val_dataloader():
            correct += int((module.model(images).argmax(-1) == labels).sum())
            total += labels.numel()
    assert quant.float_metrics["top1"] == pytest.approx(correct / total)


def test_run_is_idempotent_within_a_fit(fitted):
    trainer, module, quant, _, _ = fitted
    before = [r.quantized for r in quant.results]
    again = quant.run(trainer, module)
    assert [r.quantized for r in again] == before
    assert all(a is b for a, b in zip((r.quantized for r in again), before))


class ForeignModule(pl.LightningModule):
    """Not a ViTClassifier: any LightningModule that keeps its timm model in ``self.model``."""

    def __init__(self, model_kwargs: dict) -> None:
        super().__init__()
        self.model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **model_kwargs)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_foreign_lightning_module_with_val_calibration(tmp_path, capture_logger, tiny_vit_kwargs):
    logger = capture_logger()
    quant = Quantization(["int8_pt2e:xnnpack"], calibration_batches=1, calibration_split="val", eval_batches=2)
    trainer = _trainer([quant], logger, tmp_path, epochs=1, limit_train_batches=5, limit_val_batches=0)
    trainer.fit(ForeignModule(tiny_vit_kwargs), _digits())
    (result,) = quant.results
    assert result.error is None, result.error
    assert isinstance(result.quantized.module, torch.fx.GraphModule)
    assert "quantization/int8_pt2e_xnnpack/top1" in logger.metrics


def test_a_failing_target_is_recorded_and_the_others_go_on(tmp_path, monkeypatch, trained_classifier):
    real = q_engine.quantize

    def flaky(model, target, *args, **kwargs):
        if target.method == "int8_static":
            raise RuntimeError("simulated tracing failure")
        return real(model, target, *args, **kwargs)

    monkeypatch.setattr("pqv_lightning.quantization.evaluation.quantize", flaky)
    quant = Quantization(["int8_static:x86", "int8_dynamic:x86"], calibration_batches=1, eval_batches=1)
    trainer = _trainer([quant], False, tmp_path, epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(trained_classifier(), _digits())
    failed, ok = quant.results
    assert failed.quantized is None and "simulated tracing failure" in failed.error
    assert ok.error is None and ok.quantized is not None
    assert quant.quantized_models == [ok.quantized]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ["int9_dynamic"]}, r"target='int9_dynamic' is invalid.*int8_dynamic"),
        ({"targets": ["int8_dynamic:armv7"]}, r"backend='armv7' is invalid; accepted: x86, fbgemm, qnnpack"),
        ({"targets": ["int8_static:x86"], "calibration_batches": 0}, r"calibration_batches=0.*int8_static:x86"),
        ({"targets": ["int8_pt2e"], "calibration_batches": 0}, r"calibration_batches=0.*int8_pt2e:xnnpack"),
        ({"targets": ["fp16"], "calibration_batches": -1}, r"calibration_batches=-1 is invalid; accepted: an int >= 0"),
        ({"targets": ["fp16", "fp16"]}, r"listed twice"),
        ({"targets": []}, r"targets=\[\] is invalid; accepted: one or more of fp16"),
        ({"calibration_split": "test"}, r"calibration_split='test' is invalid; accepted: train, val"),
        ({"eval_batches": 0}, r"eval_batches=0 is invalid; accepted: None or an int >= 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantization(**kwargs)


def test_zero_calibration_is_fine_for_dynamic_targets():
    assert Quantization(["int8_dynamic:x86", "fp16"], calibration_batches=0).config.calibration_batches == 0


def test_engine_missing_from_this_torch_build(monkeypatch):
    monkeypatch.setattr(q_targets, "installed_legacy_engines", lambda: ["qnnpack"])
    with pytest.raises(ValueError, match=r"backend='x86' is invalid; accepted: a quantized engine .*: qnnpack"):
        Quantization(["int8_dynamic:x86"])


class _CountSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_missing_model_attribute_and_validation_data_fail_before_training(
    tmp_path, trained_classifier, tiny_vit_kwargs
):
    counter = _CountSteps()
    trainer = _trainer([Quantization(["fp16"], model_attribute="net"), counter], False, tmp_path, epochs=1)
    with pytest.raises(AttributeError, match=r"attribute 'net'"):
        trainer.fit(trained_classifier(), _digits())
    images = torch.randn(8, 1, 16, 16)
    loader = torch.utils.data.DataLoader(list(zip(images, torch.arange(8) % 10)), batch_size=4)
    trainer = _trainer([Quantization(["fp16"]), counter], False, tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"Quantization evaluates on validation data, but this fit has none"):
        trainer.fit(ForeignModule(tiny_vit_kwargs), train_dataloaders=loader)
    assert counter.steps == 0
