"""Data modules: the offline digits, and Hugging Face datasets from local folders the tests create."""

import numpy as np
import pytest
import torch
from PIL import Image

from pqv_lightning.datamodules import DigitsDataModule, HFImageDataModule


def test_digits_split_is_seeded_disjoint_and_complete():
    first, second = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    first.setup(), second.setup()
    sizes = {name: len(split) for name, split in first._splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == 270 and sizes["test"] == 270
    for name in ("train", "val", "test"):
        assert torch.equal(first._splits[name].images, second._splits[name].images)
    other = DigitsDataModule(seed=4)
    other.setup()
    assert not torch.equal(first._splits["val"].labels, other._splits["val"].labels)


def test_digits_shapes_channels_and_train_only_augmentation():
    dm = DigitsDataModule(img_size=24, in_chans=3, batch_size=8)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 24, 24) and labels.dtype == torch.long
    assert dm._splits["train"].max_shift == 3 and dm._splits["val"].max_shift == 0
    val_a = next(iter(dm.val_dataloader()))[0]
    val_b = next(iter(dm.val_dataloader()))[0]
    assert torch.equal(val_a, val_b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 4}, "img_size=4 is invalid; accepted: an int >= 8"),
        ({"in_chans": 2}, "in_chans=2 is invalid; accepted: 1, 3"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction=0.6"),
    ],
)
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def _write_image_folder(root, classes=("cat", "dog"), per_class=6, size=20):
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // (index + 1)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_with_timm_transforms_from_model_name(tmp_path):
    root = _write_image_folder(tmp_path / "pets")
    dm = HFImageDataModule(str(root), model_name="vit_tiny_patch16_224", img_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert dm.data_config()["mean"] == (0.5, 0.5, 0.5)  # vit_tiny's own normalisation, from timm
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1}
    val_images, _ = next(iter(dm.val_dataloader()))  # no validation split: a seeded share of train
    assert val_images.shape[1:] == (3, 32, 32)


def test_saved_dataset_with_custom_columns_and_grey_images(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(8)]
    features = datasets.Features({"img": datasets.Image(), "target": datasets.ClassLabel(names=["a", "b", "c"])})
    split = datasets.Dataset.from_dict({"img": images, "target": [0, 1, 2, 0, 1, 2, 0, 1]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "saved")
    dm = HFImageDataModule(
        str(tmp_path / "saved"),
        image_column="img",
        label_column="target",
        test_split="test",
        img_size=16,
        in_chans=1,
        mean=(0.5,),
        std=(0.25,),
        batch_size=8,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.class_names == ["a", "b", "c"]
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (8, 1, 16, 16) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_missing_column_names_the_columns(tmp_path):
    root = _write_image_folder(tmp_path / "pets")
    dm = HFImageDataModule(str(root), label_column="class", img_size=16, num_workers=0)
    with pytest.raises(ValueError, match=r"label_column='class' is not a column.*\['image', 'label'\]"):
        dm.setup("fit")


def test_missing_data_folder_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFImageDataModule(str(tmp_path / "nowhere"))


def test_missing_split_is_named(tmp_path):
    root = _write_image_folder(tmp_path / "pets")
    dm = HFImageDataModule(str(root), test_split="holdout", img_size=16, num_workers=0)
    with pytest.raises(ValueError, match=r"test_split='holdout' is not a split"):
        dm.setup("fit")


def test_class_count_mismatch_with_model_fails_at_setup(tmp_path, tiny_vit_kwargs):
    import lightning.pytorch as pl

    from pqv_lightning import ViTClassifier

    root = _write_image_folder(tmp_path / "pets")
    dm = HFImageDataModule(str(root), img_size=16, in_chans=1, batch_size=4, num_workers=0)
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"data has 2 classes but the model has num_classes=10"):
        trainer.fit(module, dm)
