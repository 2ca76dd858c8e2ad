"""ViTClassifier: model creation, weights, optimisation, metrics and the errors a user meets first."""

import itertools

import lightning.pytorch as pl
import pytest
import timm
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning.module import warmup_cosine


def test_wraps_timm_model_as_model_attribute(tiny_classifier):
    assert isinstance(tiny_classifier.model, timm.models.VisionTransformer)
    logits = tiny_classifier(torch.randn(3, 1, 16, 16))
    assert logits.shape == (3, 10)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown timm model name 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        ViTClassifier("vit_tiny_patch16_22", num_classes=10)


def test_patch_size_must_divide_image_size(tiny_vit_kwargs):
    with pytest.raises(ValueError, match=r"img_size=18 is not divisible by patch_size=4"):
        ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs={**tiny_vit_kwargs, "img_size": 18})


def test_local_checkpoint_file_loads_through_timm(tmp_path, tiny_vit_kwargs):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    module = ViTClassifier("vit_tiny_patch16_224", 10, checkpoint_path=str(path), model_kwargs=tiny_vit_kwargs)
    for name, tensor in source.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    # Another class count: the backbone is kept, the classifier re-initialised (timm's rule for pretrained).
    five = ViTClassifier("vit_tiny_patch16_224", 5, checkpoint_path=str(path), model_kwargs=tiny_vit_kwargs)
    assert torch.equal(five.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert five.model.head.out_features == 5


def test_missing_checkpoint_file_is_named(tmp_path, tiny_vit_kwargs):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        ViTClassifier("vit_tiny_patch16_224", 10, checkpoint_path=str(missing), model_kwargs=tiny_vit_kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0}, "lr=0 is invalid; accepted: a finite number > 0"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_hyperparameters(kwargs, message, tiny_vit_kwargs):
    args = {
        "model_name": "vit_tiny_patch16_224",
        "num_classes": 10,
        "model_kwargs": tiny_vit_kwargs,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        ViTClassifier(**args)


def test_warmup_cosine_schedule_shape():
    factors = [warmup_cosine(step, warmup_steps=10, total_steps=110, min_factor=0.01) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_fit_logs_top1_top5_and_learns(tiny_vit_kwargs, digits):
    pl.seed_everything(0)
    module = ViTClassifier(
        "vit_tiny_patch16_224",
        10,
        model_kwargs={**tiny_vit_kwargs, "global_pool": "avg"},
        lr=2e-3,
        warmup_epochs=0,
    )
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=20,
    )
    trainer.fit(module, digits)
    tiny_classifier = module
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/top1", "train/top5", "val/loss", "val/top1", "val/top5"):
        assert key in metrics, key
    assert metrics["val/top5"] >= metrics["val/top1"]
    assert metrics["val/top1"] > 0.2  # chance is 0.1
    assert trainer.lr_scheduler_configs[0].interval == "step"
    # top-1 is the share of images classified right (micro), not a class-balanced mean.
    val_loader = digits.val_dataloader()
    with torch.no_grad():
        right = sum(int((tiny_classifier(x).argmax(1) == y).sum()) for x, y in val_loader)
    validated = trainer.validate(tiny_classifier, digits, verbose=False)[0]
    assert validated["val/top1"] == pytest.approx(right / len(val_loader.dataset), abs=1e-6)
    tested = trainer.test(tiny_classifier, digits, verbose=False)[0]
    assert {"test/top1", "test/top5"} <= set(tested)
    predictions = trainer.predict(tiny_classifier, digits)
    assert predictions[0]["probabilities"].shape[1] == 10
    assert torch.allclose(predictions[0]["probabilities"].sum(1), torch.ones(len(predictions[0]["prediction"])))


def test_class_count_mismatch_fails_before_training(tiny_vit_kwargs, digits):
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=7, model_kwargs=tiny_vit_kwargs)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"data has 10 classes but the model has num_classes=7"):
        trainer.fit(module, digits)


def test_checkpoint_loads_with_weights_only(tmp_path, tiny_classifier, digits):
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_classifier, digits)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = ViTClassifier.from_checkpoint(path)
    for name, tensor in tiny_classifier.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name


def test_restart_epochs_start_the_schedule_again(tmp_path, tiny_vit_kwargs):
    """With restart_epochs=[2] of 4 epochs, the LR anneals by the end of epoch 1 and warms up again in epoch 2."""
    import lightning.pytorch as pl

    from pqv_lightning.datamodules import DigitsDataModule
    from pqv_lightning.module import restarted_warmup_cosine, warmup_cosine

    assert restarted_warmup_cosine(3, (0, 10), 20, 2, 0.0) == warmup_cosine(3, 2, 10, 0.0)
    assert restarted_warmup_cosine(13, (0, 10), 20, 2, 0.0) == warmup_cosine(3, 2, 10, 0.0)

    lrs = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lrs.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))

    module = ViTClassifier(
        "vit_tiny_patch16_224", 10, model_kwargs=tiny_vit_kwargs, lr=1e-3, warmup_epochs=0.5, restart_epochs=[2]
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=4, limit_train_batches=4, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[RecordLR()],
    )  # fmt: skip
    trainer.fit(module, datamodule=DigitsDataModule(img_size=16, in_chans=1, batch_size=16))
    by_epoch = {e: [lr for epoch, lr in lrs if epoch == e] for e in range(4)}
    assert by_epoch[1][-1] < 0.2e-3 and by_epoch[3][-1] < 0.2e-3  # annealed at the end of each cycle
    assert by_epoch[2][0] < by_epoch[2][1] and max(by_epoch[2]) == pytest.approx(1e-3)  # a new warm-up
    with pytest.raises(ValueError, match=r"restart_epochs\[0\]=0 is invalid"):
        ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=tiny_vit_kwargs, restart_epochs=[0])
