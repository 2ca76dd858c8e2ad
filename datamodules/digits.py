"""The offline default data set: scikit-learn's handwritten digits (real data shipped inside the package)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pqv_lightning.datamodules._loaders import make_loader
from pqv_lightning.utils.checks import check_choice, check_int

__all__ = ["DigitsDataModule"]


class _TensorImages(Dataset):
    """Images already resized and normalised; optional random translation for training."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0) -> None:
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            # Shift with edge padding: the digit moves, the background stays background.
            padded = F.pad(image[None], [self.max_shift] * 4, mode="replicate")[0]
            top, left = self.max_shift + dy, self.max_shift + dx
            image = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
        return image, self.labels[index]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), resized for a ViT; no download needed.

    Args:
        img_size: side of the square images the model sees (bilinear resize from 8x8).
        in_chans: channels (the grey image is repeated), to match the model's ``in_chans``.
        batch_size: per-process batch size.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        seed: seed of the split, so that every run and every DDP rank sees the same split.
        augment: random translation of up to ``img_size // 8`` pixels (one source pixel) for training only.
        num_workers: data loader workers.
    """

    num_classes = 10

    def __init__(
        self,
        img_size: int = 16,
        in_chans: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("img_size", img_size, 8, accepted="an int >= 8 (the digits are 8x8)")
        check_choice("in_chans", in_chans, (1, 3))
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r} must be in [0, 1) "
                "(val > 0) and leave images for training."
            )
        self.save_hyperparameters()
        self.class_names = [str(digit) for digit in range(10)]
        #: (channels, height, width) of the images it yields, checked against the model's at setup.
        self.image_shape = (in_chans, img_size, img_size)
        self._splits: dict[str, _TensorImages] = {}

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        size = self.hparams.img_size
        if size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images.clamp_(0, 1), torch.tensor(digits.target, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        images, labels = self._load()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = round(len(labels) * self.hparams.val_fraction)
        n_test = round(len(labels) * self.hparams.test_fraction)
        parts = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
        }
        train = images[parts["train"]]
        mean, std = train.mean(), train.std()
        images = (images - mean) / std
        if self.hparams.in_chans == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        self.mean, self.std = float(mean), float(std)
        shift = max(1, self.hparams.img_size // 8) if self.hparams.augment else 0
        for name, index in parts.items():
            self._splits[name] = _TensorImages(images[index], labels[index], shift if name == "train" else 0)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return make_loader(self._splits[split], self.hparams.batch_size, shuffle, self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not len(self._splits.get("test", ())) and self._splits:
            raise ValueError("test_fraction is 0: there is no test split.")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
