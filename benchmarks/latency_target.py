"""Pruning to a measured latency, checked after the fit: is the stated target met by the file that ships?

For each model, a Lightning fit with ``StructuredPruning(ratio=None, target_latency_ms=T, latency_target=KIND,
threads=N)`` (the ratio searched before training by exporting and timing pruned copies) and ``MobileExport``
writing that kind of file; after the fit the exported file is loaded in its own runtime in a fresh process and
timed again (``--runs`` calls at ``N`` threads in ``--rounds`` batches, the quietest batch's median, as the search
times its candidates), and compared with
``T``:

* ``digits``: the quickstart ViT (configs/quickstart.yaml's model and data), ``--digits-epochs`` epochs, pruned
  after the first (Taylor importance, 10 calibration batches);
* ``deit_small``: ``deit_small_patch16_224`` at 224 px (``pretrained=False``) on random images, one short epoch,
  pruned at fit start (speed, not accuracy).

``T`` is ``--fraction`` of the unpruned file's own latency measured first (or ``--target-ms``), so that it is
reachable on any CPU. Prints per model: the target, the ratio found, the search's measurement, the latency of the
shipped file after the fit, and the deviation (target: the file within 10% of ``T``).

    python benchmarks/latency_target.py --models digits deit_small --kind onnx-int8 --threads 2 --digits-threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from _common import header
from torch.utils.data import DataLoader, TensorDataset

from pqv_lightning import ViTClassifier
from pqv_lightning.apps.trainers import quiet_trainer
from pqv_lightning.callbacks import MobileExport, StructuredPruning
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.latency_search import LATENCY_ARTIFACTS, LatencyTarget, measure_pruned_latency
from pqv_lightning.measure import fresh_process_latency
from pqv_lightning.pruning import PruningSpec

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class RandomImages(pl.LightningDataModule):
    """Random 224 px images and labels (deit_small's speed does not depend on what it sees)."""

    def __init__(self, size: int = 224, images: int = 16, batch_size: int = 8, classes: int = 10) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.image_shape = (3, size, size)
        self.data = TensorDataset(torch.randn(images, *self.image_shape, generator=generator),
                                  torch.randint(0, classes, (images,), generator=generator))  # fmt: skip
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def model_and_data(name: str) -> tuple[ViTClassifier, pl.LightningDataModule, dict]:
    if name == "digits":
        config = yaml.safe_load(QUICKSTART.read_text())
        module = ViTClassifier(**config["model"]["init_args"])
        return module, DigitsDataModule(**config["data"]["init_args"]), {"importance": "taylor"}
    module = ViTClassifier("deit_small_patch16_224", num_classes=10, lr=1e-4, warmup_epochs=0.0)
    return module, RandomImages(), {"importance": "l2"}


def run(name: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    threads = args.digits_threads if name == "digits" else args.threads
    module, data, pruning_args = model_and_data(name)
    data.setup("fit")
    x = next(iter(data.train_dataloader()))[0][:1].float()
    probe = LatencyTarget(1.0, args.kind, threads, warmup=args.warmup, runs=args.runs, rounds=args.rounds)
    dense_ms = measure_pruned_latency(module.model, PruningSpec(ratio=0.0), 0.0, x, probe)
    target = args.target_ms if args.target_ms is not None else args.fraction * dense_ms
    epochs = args.digits_epochs if name == "digits" else 1
    at_epoch = 1 if name == "digits" else 0
    fmt, precision = args.kind.split("-", 1)
    pruning = StructuredPruning(ratio=None, target_latency_ms=target, latency_target=args.kind, threads=threads,
                                at_epoch=at_epoch, **pruning_args)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix=f"pqv-latency-target-{name}-"))
    export = MobileExport(formats=[fmt], output_dir=work / "artifacts", on_failure="warn",
                          val_batches=None if name == "digits" else 1,
                          executorch_precisions=[precision] if fmt == "executorch" else [],
                          onnx_precisions=[precision] if fmt == "onnx" else [],
                          aoti_precisions=[precision] if fmt == "aoti" else [])  # fmt: skip
    limits = {} if name == "digits" else {"limit_train_batches": 2, "limit_val_batches": 1}
    quiet_trainer(epochs, [pruning, export], default_root_dir=work, num_sanity_val_steps=0, **limits).fit(
        module, datamodule=data
    )
    (record,) = [r for r in export.records if r.name == args.kind]
    if record.status != "ok":
        raise RuntimeError(f"{name}: the {args.kind} file did not verify: {record.reason}")
    shipped = fresh_process_latency(
        record.path, fmt, list(x.shape), threads, args.warmup, args.runs, rounds=args.rounds
    ).median_ms
    search = pruning.latency_search
    return {
        "model": name, "threads": threads, "dense_ms": dense_ms, "target_ms": target, "ratio": search.ratio,
        "search_ms": search.latency_ms, "trials": len(search.trials), "trial_ms": sorted(search.trials.items()),
        "shipped_ms": shipped, "deviation": shipped / target - 1, "seconds": time.perf_counter() - start,
        "macs": (pruning.result.macs_before, pruning.result.macs_after),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("digits", "deit_small"), default=["digits", "deit_small"])
    parser.add_argument("--kind", choices=LATENCY_ARTIFACTS[1:], default="onnx-int8", help="the file to prune for")
    parser.add_argument("--threads", type=int, default=2, help="runtime threads for deit_small")
    parser.add_argument(
        "--digits-threads", type=int, default=1,
        help="runtime threads for the digits ViT (sub-millisecond: a second thread adds more noise than speed)",
    )  # fmt: skip
    parser.add_argument("--fraction", type=float, default=0.6, help="target = this fraction of the unpruned file")
    parser.add_argument("--target-ms", type=float, default=None, help="a fixed target instead (all models)")
    parser.add_argument("--digits-epochs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="batches of the runs; the quietest one's median counts")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    warnings.filterwarnings("ignore")
    print(header(args.threads))
    print("command: python " + " ".join(sys.argv), flush=True)
    rows = []
    for name in args.models:
        row = run(name, args)
        rows.append(row)
        print(
            f"{name}: {args.kind} at {row['threads']} thread(s): unpruned {row['dense_ms']:.3f} ms, target "
            f"{row['target_ms']:.3f} ms -> ratio {row['ratio']:.4g} ({row['trials']} trials; MACs "
            f"{row['macs'][0] / 1e6:.1f}M -> {row['macs'][1] / 1e6:.1f}M), search measured {row['search_ms']:.3f} ms; "
            f"shipped file after the fit {row['shipped_ms']:.3f} ms ({row['deviation'] * 100:+.1f}% vs target) -> "
            f"{'MET' if abs(row['deviation']) <= 0.10 else 'NOT MET'} (within 10%); {row['seconds']:.0f} s",
            flush=True,
        )
        print("  trials (ratio: ms): " + ", ".join(f"{r:.4g}: {ms:.3f}" for r, ms in row["trial_ms"]), flush=True)
    return 0 if all(abs(r["deviation"]) <= 0.10 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
