"""HFImageDataModule's training augmentation (presets, overrides, checks) and the Hugging Face path through the CLI
with the default TensorBoard logger, on image folders the tests write."""

import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pqv_lightning.datamodules import HFImageDataModule

TINY_MODEL = '{"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 1, "embed_dim": 32, "num_heads": 2}'


def _digits_folder(root, per_class=4):
    """The first ``per_class`` scikit-learn digits of each class as 8x8 grey PNGs in ``root/<digit>/``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True)
        for index in np.flatnonzero(digits.target == digit)[:per_class]:
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    return root


def _photo_folder(root, size=(160, 144)):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _train_transform(dm):
    dm.setup("fit")
    return repr(dm._transforms()[True])


def test_auto_is_mild_for_small_images_and_timm_imagenet_recipe_for_large(tmp_path):
    digits = HFImageDataModule(str(_digits_folder(tmp_path / "digits")), img_size=16, in_chans=1, num_workers=0)
    with pytest.raises(RuntimeError, match="call setup"):
        digits.augmentation_config()
    mild = _train_transform(digits)
    assert digits.augmentation_config()["augment"] == "mild"
    assert "scale=(0.8, 1.0), ratio=(0.9, 1.1111)" in mild
    assert "Flip" not in mild and "ColorJitter" not in mild and "Erasing" not in mild

    photos = _photo_folder(tmp_path / "photos")
    large = HFImageDataModule(str(photos), img_size=128, num_workers=0)
    imagenet = _train_transform(large)
    assert large.augmentation_config()["augment"] == "imagenet"
    # timm's own training defaults, exactly what HFImageDataModule applied before augment existed
    assert imagenet == repr(timm.data.create_transform(**large.data_config(), is_training=True))
    assert "scale=(0.08, 1.0)" in imagenet and "RandomHorizontalFlip(p=0.5)" in imagenet

    downscaled = HFImageDataModule(str(photos), img_size=32, num_workers=0)  # large photos, small model input
    downscaled.setup("fit")
    assert downscaled.augmentation_config()["augment"] == "mild"


def test_each_setting_overrides_the_preset_and_reaches_timm(tmp_path):
    root = _digits_folder(tmp_path / "digits")
    dm = HFImageDataModule(
        str(root),
        img_size=16,
        in_chans=1,
        augment="imagenet",
        crop_scale=(0.5, 1),
        crop_ratio=(1, 1),
        hflip=0,
        vflip=0.25,
        color_jitter=(0.1, 0.2, 0.3, 0.05),
        random_erasing=0.5,
        num_workers=0,
    )
    train = _train_transform(dm)
    config = dm.augmentation_config()
    assert config["augment"] == "imagenet" and config["crop_scale"] == (0.5, 1.0) and config["hflip"] == 0
    assert "scale=(0.5, 1.0), ratio=(1.0, 1.0)" in train
    assert "RandomHorizontalFlip" not in train and "RandomVerticalFlip(p=0.25)" in train
    assert re.search(r"ColorJitter\(brightness=\(0.9, 1.1\).*hue=\(-0.05, 0.05\)\)", train)
    assert "RandomErasing(p=0.5" in train

    policy = HFImageDataModule(
        str(root), img_size=16, in_chans=1, auto_augment="rand-m9-mstd0.5-inc1", batch_size=8, num_workers=0
    )
    assert "RandAugment" in _train_transform(policy)
    images, _ = next(iter(policy.train_dataloader()))  # RandAugment on grey images
    assert images.shape == (8, 1, 16, 16) and torch.isfinite(images).all()


def test_none_is_deterministic_and_mild_is_not(tmp_path):
    root = _digits_folder(tmp_path / "digits", per_class=1)

    def two_passes(augment):
        dm = HFImageDataModule(str(root), img_size=16, in_chans=1, augment=augment, val_fraction=0.5, num_workers=0)
        dm.setup("fit")
        return [torch.stack([row["image"] for row in dm._splits["train"]]) for _ in range(2)]

    first, second = two_passes("none")
    assert torch.equal(first, second)
    first, second = two_passes("mild")
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"augment": "heavy"}, "augment='heavy' is invalid; accepted: auto, mild, imagenet, none."),
        ({"crop_scale": (0.9, 0.5)}, r"crop_scale=\(0.9, 0.5\) is invalid; accepted: None or \(min, max\) with 0 <"),
        ({"crop_scale": (0, 1)}, r"crop_scale=\(0, 1\) is invalid; accepted: None or \(min, max\) with 0 < min"),
        ({"crop_scale": 0.5}, r"crop_scale=0.5 is invalid; accepted: None or \(min, max\) with 0 < min <= max <= 1"),
        ({"crop_ratio": (1.2,)}, r"crop_ratio=\(1.2,\) is invalid; accepted: None or \(min, max\) with 0 < min <="),
        ({"hflip": 1.5}, r"hflip=1.5 is invalid; accepted: None or a number in \[0, 1\]"),
        ({"vflip": True}, r"vflip=True is invalid; accepted: None or a number in \[0, 1\]"),
        ({"color_jitter": -0.1}, "color_jitter=-0.1 is invalid; accepted: None or a finite number >= 0"),
        ({"color_jitter": (0.1, 0.2)}, r"color_jitter=\(0.1, 0.2\) is invalid; accepted: None, a number >= 0, or"),
        ({"color_jitter": (0.1, 0.1, 0.1, 0.9)}, r"color_jitter\[3\]=0.9 is invalid; accepted: a number in \[0, 0.5"),
        ({"auto_augment": "rand-x9"}, "auto_augment='rand-x9' is invalid; accepted: None or a timm policy"),
        ({"auto_augment": "fancy"}, "auto_augment='fancy' is invalid; accepted: None or a timm policy"),
        ({"random_erasing": 2}, r"random_erasing=2 is invalid; accepted: None or a number in \[0, 1\]"),
        ({"augment": "none", "hflip": 0.5}, "hflip=0.5 is invalid; accepted: None with augment='none'"),
    ],
)
def test_bad_augmentation_arguments_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HFImageDataModule(str(tmp_path), **kwargs)


def test_model_name_is_usable_and_does_not_clash_with_the_model_in_the_logger(tmp_path, tiny_vit_kwargs):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from pqv_lightning import ViTClassifier

    root = _digits_folder(tmp_path / "digits")
    dm = HFImageDataModule(str(root), model_name="vit_small_patch16_224", in_chans=1, batch_size=8, num_workers=0)
    assert dm.model_name == "vit_small_patch16_224" and "model_name" not in dm.hparams
    assert dm.data_config()["mean"] == (0.5,)  # vit_small's normalisation by name (timm's default is 0.485)
    assert dm.data_config()["input_size"] == (1, 224, 224)
    dm.setup("fit")  # early, to read the class count; the trainer's setup then follows its model
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=dm.num_classes, model_kwargs=tiny_vit_kwargs)
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="hf")
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, dm)
    assert logger.hparams["model_name"] == "vit_tiny_patch16_224" and logger.hparams["augment"] == "auto"
    assert dm._splits["val"][0]["image"].shape == (1, 16, 16)  # the trainer's model's input size, not vit_small's


def test_hf_digits_recipe_builds_its_data_module(tmp_path, monkeypatch):
    from pathlib import Path

    from pqv_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "hf_digits.yaml"
    overrides = [f"--data.init_args.dataset={_digits_folder(tmp_path / 'digits')}", "--data.init_args.hflip=0.25"]
    data = main(["--config", str(recipe), *overrides], run=False).datamodule
    assert isinstance(data, HFImageDataModule) and data.hparams.augment == "auto"
    data.setup("fit")
    assert data.augmentation_config()["augment"] == "mild" and data.augmentation_config()["hflip"] == 0.25


@pytest.mark.slow
def test_cli_fit_on_an_image_folder_with_the_default_logger(cli, tmp_path):
    import yaml

    root = _digits_folder(tmp_path / "digits")
    args = [
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--model=pqv_lightning.ViTClassifier",
        "--model.num_classes=10",
        f"--model.model_kwargs={TINY_MODEL}",
        "--data=pqv_lightning.datamodules.HFImageDataModule",
        f"--data.dataset={root}",
        "--data.img_size=16",
        "--data.in_chans=1",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.crop_scale=[0.7, 1.0]",
    ]
    result = cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "augment='auto' uses 'mild'" in result.stdout + result.stderr
    run = tmp_path / "runs" / "pqv" / "version_0"  # the CLI's default TensorBoard logger
    assert list(run.glob("events.out.tfevents.*")) and list(run.glob("checkpoints/*.ckpt"))
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["model_name"] == "vit_tiny_patch16_224" and hparams["crop_scale"] == [0.7, 1.0]
