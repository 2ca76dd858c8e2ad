"""Any image-classification data set through Hugging Face ``datasets``: hub name, image folder or saved set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from pqv_lightning.datamodules._loaders import make_loader
from pqv_lightning.utils.checks import check_choice, check_int, check_number

__all__ = ["HFImageDataModule", "resolve_timm_data_config"]


def resolve_timm_data_config(model: nn.Module | None = None, model_name: str | None = None) -> dict[str, Any]:
    """timm's data config (input size, interpolation, mean/std, crop) for a model or a model name.

    timm keeps the pretrained config's input size even when the model was built with another ``img_size``;
    the size and channels the model really takes are read from its patch embedding where it has one.
    """
    if model is not None:
        config = dict(timm.data.resolve_model_data_config(model))
        patch_embed = getattr(model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        proj = getattr(patch_embed, "proj", None)
        if img_size is not None:
            channels = proj.in_channels if isinstance(proj, nn.Conv2d) else config["input_size"][0]
            config["input_size"] = (channels, *tuple(img_size))
        return config
    if model_name is not None:
        return dict(timm.data.resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg(model_name).to_dict()))
    return dict(timm.data.resolve_data_config(args={"input_size": (3, 224, 224)}))  # timm's ImageNet defaults


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


class HFImageDataModule(pl.LightningDataModule):
    """Image classification from ``datasets``: a hub name, a local image folder, or a ``save_to_disk`` folder.

    Transforms come from the timm model's data config (resize, crop, mean/std) — the trainer's model's at
    ``setup``, else ``model_name``'s — unless ``img_size``, ``mean``, ``std``, ``crop_pct`` or ``interpolation``
    override them. Class names and count are read from the label column's ``ClassLabel`` feature.

    Args:
        dataset: hub name (``"cifar10"``), a folder of class sub-folders (``imagefolder``), or a folder written
            by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        image_column: column holding the images.
        label_column: column holding the integer class labels.
        train_split: split to train on.
        val_split: split to validate on; when the data set lacks it, ``val_fraction`` of ``train_split`` is
            held out with a seeded split.
        test_split: split to test on (optional).
        val_fraction: share of the training split held out when there is no validation split.
        seed: seed of that split.
        model_name: timm model whose data config to use when no trainer provides the model.
        img_size, mean, std, crop_pct, interpolation: overrides of the timm data config.
        in_chans: 1 converts images to grey, 3 to RGB.
        batch_size: per-process batch size.
        num_workers: data loader workers.
        cache_dir: ``datasets`` cache folder.
    """

    def __init__(
        self,
        dataset: str,
        image_column: str = "image",
        label_column: str = "label",
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        model_name: str | None = None,
        img_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        in_chans: int = 3,
        batch_size: int = 64,
        num_workers: int = 4,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("in_chans", in_chans, (1, 3))
        check_number("val_fraction", val_fraction, 0, 1, min_open=True, max_open=True)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("img_size", img_size, 1, allow_none=True)
        looks_local = os.sep in dataset or dataset.startswith((".", "~")) or os.path.exists(dataset)
        if looks_local and not Path(dataset).expanduser().is_dir():
            raise FileNotFoundError(f"Data folder dataset={dataset!r} does not exist or is not a folder.")
        self.save_hyperparameters()
        self.class_names: list[str] = []
        self._splits: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        if not self.class_names:
            raise RuntimeError("num_classes is known after setup(): call setup() first.")
        return len(self.class_names)

    def _load(self) -> Any:
        import datasets

        source = self.hparams.dataset
        path = Path(source).expanduser()
        if path.is_dir():
            if _is_saved_to_disk(path):
                return datasets.load_from_disk(str(path))
            return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=self.hparams.cache_dir)
        return datasets.load_dataset(source, cache_dir=self.hparams.cache_dir)

    def _check_columns(self, split: Any, name: str) -> None:
        columns = list(split.features)
        for role in ("image_column", "label_column"):
            column = self.hparams[role]
            if column not in columns:
                raise ValueError(f"{role}={column!r} is not a column of split {name!r}; the columns are {columns}.")

    def prepare_data(self) -> None:
        # Downloads (hub data sets) happen once per node here; setup() then reads the local cache.
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        import datasets

        loaded = self._load()
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({self.hparams.train_split: loaded})
        train_name, val_name = self.hparams.train_split, self.hparams.val_split
        if train_name not in loaded:
            raise ValueError(f"train_split={train_name!r} is not a split of the data set; it has {list(loaded)}.")
        for name in loaded:
            self._check_columns(loaded[name], name)
        train = loaded[train_name]
        if val_name in loaded:
            val = loaded[val_name]
        else:
            held_out = train.train_test_split(test_size=self.hparams.val_fraction, seed=self.hparams.seed)
            train, val = held_out["train"], held_out["test"]
        splits = {"train": train, "val": val}
        test_name = self.hparams.test_split
        if test_name is not None:
            if test_name not in loaded:
                raise ValueError(f"test_split={test_name!r} is not a split of the data set; it has {list(loaded)}.")
            splits["test"] = loaded[test_name]
        feature = train.features[self.hparams.label_column]
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = list(feature.names)
        else:
            self.class_names = [str(label) for label in sorted(set(train[self.hparams.label_column]))]
        transforms = self._transforms()
        self._splits = {
            name: split.with_transform(self._batch_transform(transforms[name == "train"]))
            for name, split in splits.items()
        }

    def _trainer_model(self) -> nn.Module | None:
        trainer = getattr(self, "_trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return getattr(module, "model", None)

    def data_config(self) -> dict[str, Any]:
        """The resolved transform settings: timm's config for the model, with this module's overrides."""
        config = resolve_timm_data_config(self._trainer_model(), self.hparams.model_name)
        size = self.hparams.img_size
        if size is not None:
            config["input_size"] = (self.hparams.in_chans, size, size)
        for key in ("mean", "std", "crop_pct", "interpolation"):
            if self.hparams[key] is not None:
                config[key] = tuple(self.hparams[key]) if key in ("mean", "std") else self.hparams[key]
        channels = self.hparams.in_chans
        config["input_size"] = (channels, *config["input_size"][1:])
        if channels == 1:
            config["mean"], config["std"] = config["mean"][:1], config["std"][:1]
        return config

    def _transforms(self) -> dict[bool, Any]:
        config = self.data_config()
        return {training: timm.data.create_transform(**config, is_training=training) for training in (True, False)}

    def _batch_transform(self, transform: Any) -> Any:
        image_column, label_column = self.hparams.image_column, self.hparams.label_column
        mode = "L" if self.hparams.in_chans == 1 else "RGB"

        def apply(batch: dict[str, list]) -> dict[str, list]:
            return {
                "image": [transform(image.convert(mode)) for image in batch[image_column]],
                "label": batch[label_column],
            }

        return apply

    @staticmethod
    def _collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([row["image"] for row in rows])
        return images, torch.tensor([row["label"] for row in rows], dtype=torch.long)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            self.setup()
        if split not in self._splits:
            raise ValueError(f"There is no {split} split: set {split}_split.")
        return make_loader(
            self._splits[split], self.hparams.batch_size, shuffle, self.hparams.num_workers, self._collate
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self._splits else "val", shuffle=False)
