"""Accuracy recovery after pruning on digits: finetune with vs without distillation, VTP gates vs Taylor.

For each seed a dense ViT (configs/quickstart.yaml model and data) is trained once; then, for each ratio, each
method starts from those dense weights and gets the same number of epochs after the dense phase:

* ``taylor``: StructuredPruning(importance="taylor", bottleneck=True) at fit start, then finetune (the same
  channel groups as the gates: head dimensions and MLP hidden channels, embedding kept);
* ``taylor+kd``: the same with KnowledgeDistillation (soft, the dense model as teacher);
* ``gates``: SparsityGates (``--gate-epochs`` with gates + L1, prune, finetune the rest), no distillation;
* ``gates+kd``: the same with KnowledgeDistillation.

Prints validation top-1 (mean, sample std, min-max over seeds) per method and ratio.

    python benchmarks/recovery.py --dense-epochs 30 --epochs 10 --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from pqv_lightning import ViTClassifier
from pqv_lightning.apps.trainers import quiet_trainer
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.sparsity_gates import SparsityGates
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.measure import cpu_info

METHODS = ("taylor", "taylor+kd", "gates", "gates+kd")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def quickstart() -> tuple[dict, dict]:
    config = yaml.safe_load(QUICKSTART.read_text())
    return config["model"]["init_args"], config["data"]["init_args"]


WORK_DIR = tempfile.mkdtemp(prefix="pqv-recovery-")  # distillation writes its teacher file under here


def trainer(epochs: int, callbacks: list, limit_val_batches: float = 0) -> pl.Trainer:
    """A quiet CPU trainer; fitting skips validation (the result is read once, at the end)."""
    return quiet_trainer(
        epochs, callbacks, default_root_dir=WORK_DIR, num_sanity_val_steps=0, limit_val_batches=limit_val_batches
    )


def val_top1(module: ViTClassifier, data: DigitsDataModule) -> float:
    """Validation top-1 (micro) on the 270-image digits validation split, as the issue's criterion asks."""
    return float(trainer(1, [], limit_val_batches=1.0).validate(module, datamodule=data, verbose=False)[0]["val/top1"])


def run(args: argparse.Namespace) -> None:
    model_args, data_args = quickstart()
    base = {k: v for k, v in model_args.items() if k not in ("lr", "warmup_epochs")}
    results: dict[tuple[str, float], list[float]] = {}
    params: dict[tuple[str, float], int] = {}
    dense_acc = []
    for seed in args.seeds:
        pl.seed_everything(seed, workers=True)
        data = DigitsDataModule(**data_args)
        dense = ViTClassifier(**base, lr=model_args["lr"], warmup_epochs=model_args["warmup_epochs"])
        t0 = time.perf_counter()
        trainer(args.dense_epochs, []).fit(dense, datamodule=data)
        dense_acc.append(val_top1(dense, data))
        print(f"seed {seed}: dense top1 {dense_acc[-1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        state = copy.deepcopy(dense.state_dict())
        for ratio in args.ratios:
            for method in args.methods:
                pl.seed_everything(seed, workers=True)
                module = ViTClassifier(**base, lr=args.lr, warmup_epochs=args.warmup)
                module.load_state_dict(state)
                if method.startswith("taylor"):
                    callbacks = [
                        StructuredPruning(
                            ratio=ratio, importance="taylor", calibration_batches=10, bottleneck=args.taylor_bottleneck
                        )
                    ]
                else:
                    callbacks = [SparsityGates(ratio=ratio, prune_epoch=args.gate_epochs, l1_lambda=args.l1_lambda)]
                if method.endswith("+kd"):
                    callbacks.append(KnowledgeDistillation(mode="soft", temperature=args.temperature, alpha=args.alpha))
                t0 = time.perf_counter()
                trainer(args.epochs, callbacks).fit(module, datamodule=data)
                acc = val_top1(module, data)
                results.setdefault((method, ratio), []).append(acc)
                params[(method, ratio)] = sum(p.numel() for p in module.model.parameters())
                print(
                    f"seed {seed} ratio {ratio} {method}: top1 {acc:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True
                )
    dense_params = sum(p.numel() for p in dense.model.parameters())
    print()
    print(
        f"digits validation top-1 (270 images) over seeds {args.seeds}; dense {args.dense_epochs} epochs, "
        f"then {args.epochs} epochs per method (gates: {args.gate_epochs} with L1 {args.l1_lambda:g}); "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"CPU: {cpu_info().describe()}; torch {torch.__version__}")

    def row(name: str, ratio: str, accs: list[float], n_params: int) -> str:
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return (
            f"| {name:<10} | {ratio:>5} | {statistics.mean(accs):.4f} | {spread:.4f} | "
            f"{min(accs):.4f}-{max(accs):.4f} | {n_params / 1e6:.3f}M |"
        )

    print("| method     | ratio | mean   | std    | min-max       | params |")
    print("|------------|-------|--------|--------|---------------|--------|")
    print(row("dense", "-", dense_acc, dense_params))
    for ratio in args.ratios:
        for method in args.methods:
            print(row(method, f"{ratio:g}", results[(method, ratio)], params[(method, ratio)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10, help="epochs after the dense phase, for every method")
    parser.add_argument("--gate-epochs", type=int, default=None, help="SparsityGates prune_epoch (default half)")
    parser.add_argument("--l1-lambda", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=5e-4, help="finetuning peak LR (warm-up + cosine)")
    parser.add_argument("--warmup", type=float, default=0.5, help="finetuning warm-up epochs")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument(
        "--taylor-embedding",
        dest="taylor_bottleneck",
        action="store_false",
        help="let Taylor pruning narrow the embedding too (default: only inside attention and MLP, the channel "
        "groups SparsityGates prunes, so both methods compare at the same parameter count)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.gate_epochs is None:
        args.gate_epochs = max(1, args.epochs // 2)
    if not 1 <= args.gate_epochs < args.epochs:
        parser.error(f"--gate-epochs={args.gate_epochs} must be in [1, --epochs={args.epochs}).")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    run(args)


if __name__ == "__main__":
    main()
