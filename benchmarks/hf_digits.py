"""Small images through the Hugging Face data path: configs/hf_digits.yaml on scikit-learn's digits as PNG files.

Writes the 1,797 digits (8x8 px, grey) as an image folder ``train/``, ``validation/``, ``test/`` with the
split ``DigitsDataModule(seed=0)`` uses (1,257 / 270 / 270 images), then for each seed trains the recipe's
model on it through ``HFImageDataModule`` (its ``datasets`` image folder loading and timm transforms) and prints
the CPU, the resolved transform and augmentation settings and the validation top-1 after every epoch.

    python benchmarks/hf_digits.py --seeds 0 1 2                  # the recipe's defaults (augment: auto)
    python benchmarks/hf_digits.py --seeds 0 --augment imagenet   # timm's ImageNet recipe, for comparison
    python benchmarks/hf_digits.py --folder data/digits_png --seeds 0 --data crop_scale=[0.6,1.0]
    python benchmarks/hf_digits.py --seeds 0 --baseline   # DigitsDataModule on the same split, same model
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from PIL import Image

from pqv_lightning import ViTClassifier
from pqv_lightning.apps.trainers import quiet_trainer
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.datamodules.hf import AUGMENTATIONS, HFImageDataModule
from pqv_lightning.measure import cpu_info

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "hf_digits.yaml"
DIGITS_ARGS = ("img_size", "in_chans", "batch_size")


def write_digits_folder(root: Path, seed: int = 0) -> dict[str, int]:
    """scikit-learn's digits as ``root/<split>/<digit>/<index>.png`` (0-16 scaled to 0-255), split like
    ``DigitsDataModule``: 15% validation, 15% test, the rest training, by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = n_test = round(len(order) * 0.15)
    parts = {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    for split, indices in parts.items():
        for index in indices:
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return {split: len(indices) for split, indices in parts.items()}


class EpochTop1(pl.Callback):
    """Keeps the validation top-1 of every epoch (the sanity check excluded) and the data module's transform
    and augmentation settings as the fit resolved them (from the trainer's model)."""

    def __init__(self) -> None:
        self.top1: list[float] = []
        self.settings: dict = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        if isinstance(data, HFImageDataModule):
            self.settings = {"transform": data.data_config(), "augmentation": data.augmentation_config()}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.top1.append(float(trainer.callback_metrics["val/top1"]))


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs, each value read as YAML (``crop_scale=[0.6,1.0]``, ``hflip=0.5``)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--data {item!r}: expected key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run(args: argparse.Namespace) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    model_args, data_args = recipe["model"]["init_args"], recipe["data"]["init_args"]
    epochs = args.epochs or recipe["trainer"]["max_epochs"]
    folder = Path(args.folder or tempfile.mkdtemp(prefix="pqv-hf-digits-"))
    if not (folder / "train").is_dir():
        sizes = write_digits_folder(folder)
        print(f"wrote {sizes} PNG files (8x8 px) to {folder}")
    data_args = {**data_args, "dataset": str(folder), **parse_overrides(args.data)}
    if args.augment:
        data_args["augment"] = args.augment
    print(f"CPU: {cpu_info().describe()}; torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    print(f"recipe: {RECIPE.name}, {epochs} epochs; model {model_args}")
    print(f"data: {data_args}")
    finals, bests, first_95 = [], [], []
    if args.baseline:
        print("baseline: DigitsDataModule (tensors resized in memory, random shifts of 2 px), the same split")
    for seed in args.seeds:
        pl.seed_everything(seed, workers=True)
        data = (
            DigitsDataModule(**{k: data_args[k] for k in DIGITS_ARGS})
            if args.baseline
            else HFImageDataModule(**data_args)
        )
        module = ViTClassifier(**model_args)
        record = EpochTop1()
        trainer = quiet_trainer(epochs, [record], num_sanity_val_steps=0, default_root_dir=str(folder / "runs"))
        started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - started
        if seed == args.seeds[0]:
            for name, settings in record.settings.items():
                print(f"{name}: {settings}")
        print(f"seed {seed} ({seconds:.0f} s): top-1 per epoch " + " ".join(f"{t:.3f}" for t in record.top1))
        finals.append(record.top1[-1])
        bests.append(max(record.top1))
        first_95.append(next((i + 1 for i, t in enumerate(record.top1) if t >= 0.95), None))
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    print(
        f"validation top-1 (270 images) after {epochs} epochs over seeds {args.seeds}: "
        f"final {statistics.mean(finals):.4f} (std {spread:.4f}, min {min(finals):.4f}, max {max(finals):.4f}); "
        f"best {statistics.mean(bests):.4f}; first epoch >= 0.95: {first_95}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's max_epochs")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=None, help="default: the recipe's")
    parser.add_argument("--data", nargs="*", default=[], help="HFImageDataModule overrides, key=value (YAML)")
    parser.add_argument("--baseline", action="store_true", help="train on DigitsDataModule instead, same split")
    parser.add_argument("--folder", default=None, help="image folder to write (or reuse); default: a temp folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    run(args)


if __name__ == "__main__":
    main()
