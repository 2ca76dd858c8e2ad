"""Accuracy of structured pruning on digits: dense vs pruned (before finetune) vs finetuned, per importance/ratio.

The dense model and its recipe are read from ``configs/quickstart.yaml`` (model, data and max_epochs), so the
benchmark follows the quickstart as it is tuned. For every seed: train the dense model once; then for every
importance and ratio, prune a copy of it with ``StructuredPruning`` at fit start (the same callback a user runs),
measure val top-1 right after pruning, finetune ``--finetune-epochs`` epochs and measure again.

    python benchmarks/pruning_accuracy.py [--seeds 0 1 2] [--epochs 30] [--finetune-epochs 5]
        [--importances l1 l2 taylor hessian random] [--ratios 0.09375 0.25 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from pqv_lightning import ViTClassifier
from pqv_lightning.apps.trainers import quiet_trainer
from pqv_lightning.callbacks import StructuredPruning
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.pruning import IMPORTANCES

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    isa = [i for i in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f" {i}" in flags]
    return f"{name} ({', '.join(isa)})"


def quickstart_recipe(path: Path = QUICKSTART) -> dict[str, Any]:
    """Model and data arguments and epoch count of the quickstart config (the single source of the recipe)."""
    config = yaml.safe_load(path.read_text())
    model, data = config["model"], config["data"]
    for section, cls in ((model, "ViTClassifier"), (data, "DigitsDataModule")):
        if not section["class_path"].endswith(cls):
            raise ValueError(f"{path}: expected a {cls}, found {section['class_path']!r}.")
    return {
        "model": dict(model.get("init_args", {})),
        "data": dict(data.get("init_args", {})),
        "max_epochs": int(config["trainer"]["max_epochs"]),
    }


def trainer(epochs: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return quiet_trainer(epochs, callbacks or [])


@torch.no_grad()
def top1(module: pl.LightningModule, data: DigitsDataModule) -> float:
    module.eval()
    correct = total = 0
    for images, labels in data.val_dataloader():
        correct += int((module(images).argmax(-1) == labels).sum())
        total += len(labels)
    module.train()
    return correct / total


class AccuracyAtFitStart(pl.Callback):
    """Val top-1 of the model as the finetune starts (pruned, not yet trained)."""

    def __init__(self, data: DigitsDataModule) -> None:
        self.data, self.value = data, float("nan")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.value = top1(pl_module, self.data)


def mean_std(values: list[float]) -> str:
    m = 100 * statistics.fmean(values)
    return f"{m:6.2f}" if len(values) < 2 else f"{m:6.2f}±{100 * statistics.stdev(values):4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=QUICKSTART, help="quickstart-style YAML with the recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="dense epochs (default: the config's)")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=None, help="default: half the config's lr")
    parser.add_argument("--importances", nargs="+", default=list(IMPORTANCES), choices=IMPORTANCES)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.09375, 0.25, 0.5])
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for r in args.ratios:
        if not 0 <= r < 1:
            parser.error(f"--ratios: {r} is invalid; accepted: floats in [0, 1)")
    if args.finetune_epochs < 1:
        parser.error(f"--finetune-epochs={args.finetune_epochs} is invalid; accepted: >= 1")

    recipe = quickstart_recipe(args.config)
    epochs = args.epochs if args.epochs is not None else recipe["max_epochs"]
    ft_lr = args.finetune_lr if args.finetune_lr is not None else recipe["model"].get("lr", 5e-4) / 2
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    print(f"CPU: {cpu_model()}; torch threads: {args.threads}; torch {torch.__version__}")
    print(f"recipe: {args.config} ({recipe['model']['model_name']}, {recipe['model'].get('model_kwargs')})")
    print(
        f"dense: {epochs} epochs; finetune: {args.finetune_epochs} epochs at lr {ft_lr:g} (no warm-up, cosine); "
        f"seeds {args.seeds}; ratio = fraction of channels removed per prunable group (torch-pruning)"
    )
    rows: dict[tuple[str, float], dict[str, list]] = {}
    dense_acc: list[float] = []
    n_val = 0
    start = time.perf_counter()
    for seed in args.seeds:
        pl.seed_everything(seed, workers=True, verbose=False)
        data = DigitsDataModule(**recipe["data"])
        data.setup("fit")
        n_val = len(data.val_dataloader().dataset)
        dense = ViTClassifier(**recipe["model"])
        trainer(epochs).fit(dense, datamodule=data)
        dense_acc.append(top1(dense, data))
        print(f"seed {seed}: dense val top-1 {100 * dense_acc[-1]:.2f}% ({time.perf_counter() - start:.0f}s)")
        for importance in args.importances:
            for ratio in args.ratios:
                pl.seed_everything(seed, workers=True, verbose=False)
                module = ViTClassifier(**{**recipe["model"], "lr": ft_lr, "warmup_epochs": 0})
                module.model.load_state_dict(copy.deepcopy(dense.model.state_dict()))
                pruning = StructuredPruning(
                    ratio=ratio, importance=importance, calibration_batches=args.calibration_batches
                )
                at_start = AccuracyAtFitStart(data)
                trainer(args.finetune_epochs, [pruning, at_start]).fit(module, datamodule=data)
                row = rows.setdefault((importance, ratio), {"pruned": [], "finetuned": [], "result": []})
                row["pruned"].append(at_start.value)
                row["finetuned"].append(top1(module, data))
                row["result"].append(pruning.result)
                print(
                    f"  {importance:8s} ratio {ratio:<8g} pruned {100 * at_start.value:6.2f}%  "
                    f"finetuned {100 * row['finetuned'][-1]:6.2f}%  ({time.perf_counter() - start:.0f}s)"
                )

    print(f"\nval set: {n_val} images, so one image = {100 / n_val:.3f} points of top-1")
    print(f"dense val top-1: {mean_std(dense_acc)}%  (seeds {args.seeds})")
    header = (
        f"| importance | ratio | params | MACs | dense top-1 | pruned top-1 | finetuned top-1 "
        f"({args.finetune_epochs} ep) |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for (importance, ratio), row in rows.items():
        res = row["result"][0]
        print(
            f"| {importance} | {ratio:g} | {res.params_after / 1e6:.3f}M (-{100 * res.params_reduction:.1f}%) "
            f"| {res.macs_after / 1e6:.2f}M (-{100 * res.macs_reduction:.1f}%) | {mean_std(dense_acc)} "
            f"| {mean_std(row['pruned'])} | {mean_std(row['finetuned'])} |"
        )
    res = next(iter(rows.values()))["result"][0] if rows else None
    if res is not None:
        print(f"dense model: {res.params_before / 1e6:.3f}M params, {res.macs_before / 1e6:.2f}M MACs")
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
