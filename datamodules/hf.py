"""Any image-classification data set through Hugging Face ``datasets``: hub name, image folder or saved set."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from pqv_lightning.datamodules._loaders import make_loader
from pqv_lightning.utils.checks import InvalidArgumentError, check_choice, check_int, check_number, invalid

__all__ = ["AUGMENTATIONS", "AUTO_IMAGENET_MIN_SIDE", "HFImageDataModule", "resolve_timm_data_config"]

#: The training augmentation presets; ``auto`` picks ``mild`` or ``imagenet`` by image size.
AUGMENTATIONS = ("auto", "mild", "imagenet", "none")
#: ``augment="auto"`` uses timm's ImageNet recipe from this side (px) of the images the model sees.
AUTO_IMAGENET_MIN_SIDE = 128
#: ``imagenet`` is timm's ``create_transform`` training defaults; ``mild`` keeps what small images have.
_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {
        "crop_scale": (0.08, 1.0),
        "crop_ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.4,
        "auto_augment": None,
        "random_erasing": 0.0,
    },
    "mild": {
        "crop_scale": (0.8, 1.0),
        "crop_ratio": (0.9, 1 / 0.9),
        "hflip": 0.0,
        "vflip": 0.0,
        "color_jitter": 0.0,
        "auto_augment": None,
        "random_erasing": 0.0,
    },
    "none": {},
}
#: This module's augmentation arguments and the names ``timm.data.create_transform`` gives them.
_TIMM_NAMES = {
    "crop_scale": "scale",
    "crop_ratio": "ratio",
    "hflip": "hflip",
    "vflip": "vflip",
    "color_jitter": "color_jitter",
    "auto_augment": "auto_augment",
    "random_erasing": "re_prob",
}
#: Images whose sizes ``augment="auto"`` reads (the first of the training split).
_SIZE_SAMPLE = 32


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


def _check_pair(name: str, value: Any, maximum: float | None, accepted: str) -> tuple[float, float] | None:
    """``value`` as ``(low, high)`` with ``0 < low <= high`` (``<= maximum``); None passes."""
    if value is None:
        return None
    bad = invalid(name, value, f"None or {accepted}")
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise bad
    try:
        low, high = (check_number(name, v, 0, maximum, min_open=True) for v in value)
    except InvalidArgumentError:
        raise bad from None
    if low > high:
        raise bad
    return low, high


def _check_color_jitter(value: Any) -> float | tuple[float, ...] | None:
    """One factor for brightness, contrast and saturation, or 3-4 factors (the 4th, hue, at most 0.5)."""
    if value is None or not isinstance(value, Sequence) or isinstance(value, str):
        return check_number("color_jitter", value, 0, allow_none=True)
    if len(value) not in (3, 4):
        raise invalid("color_jitter", value, "None, a number >= 0, or (brightness, contrast, saturation[, hue])")
    return tuple(check_number(f"color_jitter[{i}]", v, 0, 0.5 if i == 3 else None) for i, v in enumerate(value))


def _check_auto_augment(value: Any) -> str | None:
    """A policy timm can build (its parser fails with bare asserts, so it is tried here, on a 32 px transform)."""
    if value is None:
        return None
    accepted = "None or a timm policy: 'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w3', 'original', 'v0', '3a'"
    if not isinstance(value, str) or not value:
        raise invalid("auto_augment", value, accepted)
    try:
        timm.data.create_transform(32, is_training=True, auto_augment=value)
    except Exception:
        raise invalid("auto_augment", value, accepted) from None
    return value


def _median_short_side(split: Any, column: str) -> int:
    """The median shorter side (px) of the first training images: the detail a random crop can take away."""
    images = split.select(range(min(_SIZE_SAMPLE, len(split))))[column]
    sides = sorted(min(image.size) for image in images)
    return sides[len(sides) // 2]


class HFImageDataModule(pl.LightningDataModule):
    """Image classification from ``datasets``: a hub name, a local image folder, or a ``save_to_disk`` folder.

    Transforms come from the timm model's data config (resize, crop, mean/std) — the trainer's model's at
    ``setup``, else ``model_name``'s — unless ``img_size``, ``mean``, ``std``, ``crop_pct`` or ``interpolation``
    override them. Class names and count are read from the label column's ``ClassLabel`` feature.

    The training split is augmented with timm's transforms. ``augment`` picks a preset; each augmentation argument
    left at None takes the preset's value, and one that is set overrides it:

    * ``"mild"``: random crops keeping 80-100% of the area at aspect ratio 0.9-1.11, nothing else. Small images
      have no detail to spare: timm's ImageNet crop (down to 8% of the area) leaves a few pixels of a 16 px digit,
      colour jitter has little colour to work on, and a flip turns digits and letters into other symbols.
    * ``"imagenet"``: timm's ImageNet recipe (``timm.data.create_transform``'s training defaults): crops of 8-100%
      of the area at aspect 3/4-4/3, horizontal flips (p=0.5), colour jitter 0.4.
    * ``"none"``: resize and centre crop, nothing random (no other augmentation argument may be set).
    * ``"auto"`` (default): ``"imagenet"`` when the images the model sees are at least ``AUTO_IMAGENET_MIN_SIDE``
      (128) px — the smaller of the model's input side and the median shorter side of the first 32 training
      images — else ``"mild"``. ImageNet-sized photos keep timm's recipe; digits, icons and CIFAR-sized photos
      get the mild one. For small natural photos add ``hflip=0.5``; for timm's recipe at any size set
      ``augment="imagenet"``. :meth:`augmentation_config` returns what was chosen.

    Validation and test images get timm's evaluation transform (resize, centre crop by ``crop_pct``) only.

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
        model_name: timm model whose data config to use when no trainer provides the model. Kept as an attribute,
            not a hyper-parameter: Lightning refuses to log a data module and a LightningModule whose
            hyper-parameters share a name with different values, and ``ViTClassifier`` has its own ``model_name``.
        img_size, mean, std, crop_pct, interpolation: overrides of the timm data config.
        in_chans: 1 converts images to grey, 3 to RGB.
        augment: the training augmentation preset: ``"auto"``, ``"mild"``, ``"imagenet"`` or ``"none"`` (above).
        crop_scale: ``(min, max)`` share of the image area a random crop keeps, ``0 < min <= max <= 1``.
        crop_ratio: ``(min, max)`` aspect ratio (width / height) of the random crop.
        hflip, vflip: probabilities of a horizontal / vertical flip.
        color_jitter: brightness, contrast and saturation factor (one number), or ``(brightness, contrast,
            saturation[, hue])``; 0 turns it off. timm skips it when ``auto_augment`` is set.
        auto_augment: a timm policy: ``"rand-m9-mstd0.5-inc1"`` (RandAugment, DeiT's), ``"augmix-m5-w3"``,
            ``"original"``, ``"v0"``, ``"3a"``, ...
        random_erasing: probability of erasing one random rectangle of a training image (timm's ``RandomErasing``).
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
        augment: str = "auto",
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] | None = None,
        hflip: float | None = None,
        vflip: float | None = None,
        color_jitter: float | tuple[float, ...] | None = None,
        auto_augment: str | None = None,
        random_erasing: float | None = None,
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
        check_choice("augment", augment, AUGMENTATIONS)
        self._augment_overrides = {
            "crop_scale": _check_pair("crop_scale", crop_scale, 1, "(min, max) with 0 < min <= max <= 1"),
            "crop_ratio": _check_pair("crop_ratio", crop_ratio, None, "(min, max) with 0 < min <= max"),
            "hflip": check_number("hflip", hflip, 0, 1, allow_none=True),
            "vflip": check_number("vflip", vflip, 0, 1, allow_none=True),
            "color_jitter": _check_color_jitter(color_jitter),
            "auto_augment": _check_auto_augment(auto_augment),
            "random_erasing": check_number("random_erasing", random_erasing, 0, 1, allow_none=True),
        }
        if augment == "none":
            for name, value in self._augment_overrides.items():
                if value is not None:
                    raise invalid(name, value, "None with augment='none' (no augmentation at all)")
        looks_local = os.sep in dataset or dataset.startswith((".", "~")) or os.path.exists(dataset)
        if looks_local and not Path(dataset).expanduser().is_dir():
            raise FileNotFoundError(f"Data folder dataset={dataset!r} does not exist or is not a folder.")
        self.save_hyperparameters(ignore=["model_name"])
        self.model_name = model_name
        self.class_names: list[str] = []
        self._raw_splits: dict[str, Any] = {}
        self._splits: dict[str, Any] = {}
        self._source_side: int | None = None

    @property
    def num_classes(self) -> int:
        if not self.class_names:
            raise RuntimeError("num_classes is known after setup(): call setup() first.")
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images it yields (``data_config``'s input size), checked against the
        model's at setup."""
        channels, height, width = self.data_config()["input_size"]
        return int(channels), int(height), int(width)

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
        # The transforms are rebuilt on every call: a setup() before the trainer's (to read num_classes) must not
        # leave a data config that was chosen without the trainer's model.
        if not self._raw_splits:
            self._raw_splits = self._read_splits()
        transforms = self._transforms()
        self._splits = {
            name: split.with_transform(self._batch_transform(transforms[name == "train"]))
            for name, split in self._raw_splits.items()
        }

    def _read_splits(self) -> dict[str, Any]:
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
        if self.hparams.augment == "auto" and len(train):
            self._source_side = _median_short_side(train, self.hparams.image_column)
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
        return splits

    def _trainer_model(self) -> nn.Module | None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "model", None)

    def data_config(self) -> dict[str, Any]:
        """The resolved transform settings: timm's config for the model, with this module's overrides."""
        config = resolve_timm_data_config(self._trainer_model(), self.model_name)
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

    def augmentation_config(self) -> dict[str, Any]:
        """The training augmentation: ``augment`` (``"auto"`` resolved to its preset) and the preset's settings
        with this module's overrides. With ``augment="auto"`` it is known after ``setup()``."""
        preset = self.hparams.augment
        if preset == "auto":
            if self._source_side is None:
                raise RuntimeError("augment='auto' is chosen from the image size at setup(): call setup() first.")
            side = min(self._source_side, *self.data_config()["input_size"][1:])
            preset = "imagenet" if side >= AUTO_IMAGENET_MIN_SIDE else "mild"
        overrides = {name: value for name, value in self._augment_overrides.items() if value is not None}
        return {"augment": preset, **_PRESETS[preset], **overrides}

    def _transforms(self) -> dict[bool, Any]:
        config = self.data_config()
        augmentation = self.augmentation_config()
        preset = augmentation.pop("augment")
        if self.hparams.augment == "auto":
            height, width = config["input_size"][1:]
            rank_zero_info(
                f"HFImageDataModule: augment='auto' uses {preset!r} (images {self._source_side} px, model input"
                f" {height}x{width} px): {augmentation}"
            )
        train_options = {_TIMM_NAMES[name]: value for name, value in augmentation.items()}
        if train_options.get("color_jitter") == 0:
            train_options["color_jitter"] = None  # timm would still add a ColorJitter that does nothing
        return {
            True: timm.data.create_transform(**config, is_training=True, no_aug=preset == "none", **train_options),
            False: timm.data.create_transform(**config, is_training=False),
        }

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
