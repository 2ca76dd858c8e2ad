"""Token merging's accuracy on a real offline recipe: no merging vs off the shelf vs trained with, over seeds.

Run: ``python benchmarks/tome_accuracy.py [--config configs/tome_digits.yaml] [--seeds 0 1 2] [--epochs N]
[--jobs 2] [--r R] [--work-dir DIR]``.

The recipe (default ``configs/tome_digits.yaml``: digits at 32 px in 4 px patches, 64 patch tokens, a 6-block ViT,
ToMe merging ``r`` tokens a block) is trained per seed twice, each time as a user runs it (``python train.py fit
--config ... --seed_everything N``, the recipe's own data, schedule and checkpoints; fit-end callbacks dropped):

* **no merging**: the recipe without its ``TokenMerging`` entry;
* **trained with**: the recipe with ``TokenMerging(at_epoch=0)``, merging from the first step (ToMe's setting);
* **off the shelf** needs no third training: the no-merging checkpoint loaded and given the same merging
  (:func:`pqv_lightning.tokens.apply_token_reduction`, no training).

Each model is evaluated here on the recipe's validation split (the same images for every seed: the split has its
own seed) from its final weights (``last.ckpt``: no selection on the validation set) and, second, from the
checkpoint the recipe's ``ModelCheckpoint`` keeps (best ``val/top1``, what the fit-end chain would ship). Printed:
per seed and mean +- sample std, the top-1 of the three and trained-with minus no-merging in points; the tokens
entering each block; the eager FP32 latency of both architectures at batch 1 on 1 thread (round-robin, median of
``--latency-runs`` calls); the command line and the wall time. Trainings run ``--jobs`` at a time, 1 thread each.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
import yaml
from _common import FIT_END, REPO, FitRun, drop_callbacks, header, interleaved_latency, run_recipe

from pqv_lightning import ViTClassifier
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.tokens import TokenReduction, apply_token_reduction, token_reduction_of, tokens_per_block

KINDS = ("no merging", "trained with")
COLUMNS = ("no merging", "off the shelf", "trained with")


def _merging_entry(recipe: dict) -> dict:
    entries = [cb for cb in recipe["trainer"].get("callbacks") or () if cb["class_path"].endswith(".TokenMerging")]
    if len(entries) != 1:
        raise SystemExit(f"the recipe must hold one TokenMerging callback, it holds {len(entries)}")
    return entries[0]


def _spec(entry: dict) -> TokenReduction:
    """The merging the recipe's ``TokenMerging`` applies (the callback's defaults where the recipe says nothing)."""
    init = entry.get("init_args") or {}
    keys = ("method", "r", "schedule", "proportional_attention")
    return TokenReduction(**{k: init[k] for k in keys if k in init})


@torch.inference_mode()
def _top1(model: torch.nn.Module, loader) -> float:
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    return 100 * correct / total


def _mean_std(values: list[float]) -> str:
    std = f"{statistics.stdev(values):4.2f}" if len(values) > 1 else " n/a"
    return f"{statistics.fmean(values):6.2f} +- {std}"


def _table(title: str, rows: dict[int, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'seed':>6s} " + " ".join(f"{c:>15s}" for c in COLUMNS) + f" {'with - no merging':>18s}")
    for seed, row in rows.items():
        diff = row["trained with"] - row["no merging"]
        print(f"  {seed:>6d} " + " ".join(f"{row[c]:15.2f}" for c in COLUMNS) + f" {diff:+18.2f}")
    if rows:
        cells = [_mean_std([row[c] for row in rows.values()]) for c in COLUMNS]
        diffs = [row["trained with"] - row["no merging"] for row in rows.values()]
        print(f"  {'mean':>6s} " + " ".join(f"{c:>15s}" for c in cells) + f" {_mean_std(diffs):>18s}")
        print("  (top-1 in %, difference in points; mean +- sample std over seeds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tome_digits.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs of every training (default: the recipe's)")
    parser.add_argument("--r", type=int, default=None, help="tokens merged a block (default: the recipe's)")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="trainings run at once, 1 thread each (default: cores)"
    )
    parser.add_argument("--latency-runs", type=int, default=200, help="timed eager calls of each architecture")
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    for name in ("jobs", "latency_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.r is not None and args.r < 0:
        parser.error(f"--r must be >= 0, got {args.r}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")

    t_start = time.perf_counter()
    recipe = drop_callbacks(yaml.safe_load(Path(args.config).read_text()), FIT_END)
    entry = _merging_entry(recipe)
    entry.setdefault("init_args", {})["at_epoch"] = 0
    if args.r is not None:
        entry["init_args"]["r"] = args.r
    if args.epochs is not None:
        recipe["trainer"]["max_epochs"] = args.epochs
    spec = _spec(entry)  # checked here, before any training
    recipes = {"no merging": drop_callbacks(recipe, ["TokenMerging"]), "trained with": recipe}

    print(header(1))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"recipe {args.config}: {recipe['model']['init_args']['model_name']} "
        f"{recipe['model']['init_args'].get('model_kwargs')}, {recipe['trainer']['max_epochs']} epochs; merging "
        f"{spec.describe()} from epoch 0; seeds {args.seeds}; {args.jobs} training(s) at once, 1 thread each"
    )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pqv-tome-accuracy-"))
    runs: dict[tuple[str, int], FitRun] = {}
    jobs = [(kind, seed) for seed in args.seeds for kind in KINDS]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(
                run_recipe, recipes[kind], seed, work / f"{kind.replace(' ', '_')}_seed{seed}",
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            ): (kind, seed)
            for kind, seed in jobs
        }  # fmt: skip
        for future in as_completed(futures):
            kind, seed = futures[future]
            run = runs[kind, seed] = future.result()
            state = f"final val/top1 {100 * run.top1[-1]:.2f}% after {len(run.top1)} epochs" if run.ok else (
                f"FAILED (rc {run.returncode}): {run.stderr_tail}")  # fmt: skip
            print(f"  {kind}, seed {seed}: {state}; {run.seconds:.0f} s ({time.perf_counter() - t_start:.0f} s)",
                  flush=True)  # fmt: skip

    data = DigitsDataModule(**recipe["data"]["init_args"])
    loader = data.val_dataloader()
    tables: dict[str, dict[int, dict[str, float]]] = {"last": {}, "best": {}}
    models: dict[str, torch.nn.Module] = {}
    for seed in args.seeds:
        if not (runs["no merging", seed].ok and runs["trained with", seed].ok):
            print(f"seed {seed}: left out (a training failed)")
            continue
        for which, rows in tables.items():
            plain = ViTClassifier.from_checkpoint(runs["no merging", seed].checkpoint(which)).model.eval()
            merged = ViTClassifier.from_checkpoint(runs["trained with", seed].checkpoint(which)).model.eval()
            if token_reduction_of(plain) is not None or token_reduction_of(merged) != spec:
                raise RuntimeError(
                    f"seed {seed}: checkpoints hold the reductions {token_reduction_of(plain)} and "
                    f"{token_reduction_of(merged)}, expected none and {spec}"
                )
            off_shelf = apply_token_reduction(copy.deepcopy(plain), spec)
            rows[seed] = {
                "no merging": _top1(plain, loader),
                "off the shelf": _top1(off_shelf, loader),
                "trained with": _top1(merged, loader),
            }
            for kind in KINDS if which == "last" else ():  # the fit validated these very weights last
                logged, value = 100 * runs[kind, seed].top1[-1], rows[seed][kind]
                if abs(logged - value) > 0.01:
                    print(f"  NOTE seed {seed} {kind}: evaluated {value:.2f}% here, the fit logged {logged:.2f}%")
            models.setdefault("no merging", plain)
            models.setdefault("merging", merged)

    images = len(loader.dataset)
    _table(f"validation top-1, final weights (last.ckpt), {images} images:", tables["last"])
    _table(f"validation top-1, best checkpoint (ModelCheckpoint on val/top1), {images} images:", tables["best"])
    if models:
        plain_tokens, merged_tokens = tokens_per_block(models["no merging"]), tokens_per_block(models["merging"])
        print(f"\ntokens entering each block, then leaving the last: no merging {plain_tokens}")
        print(f"  merging ({spec.describe()}): {merged_tokens}")
        x = next(iter(loader))[0][:1]
        stats = interleaved_latency(
            {name: (lambda m=m: m(x)) for name, m in models.items()}, warmup=10, runs=args.latency_runs
        )
        plain, merged = stats["no merging"], stats["merging"]
        print(
            f"eager FP32 latency, batch 1, 1 thread (torch {torch.get_num_threads()}), round-robin, median of "
            f"{args.latency_runs} calls: no merging {plain.median_ms:.3f} ms (p90 {plain.p90_ms:.3f}), merging "
            f"{merged.median_ms:.3f} ms (p90 {merged.p90_ms:.3f}): {plain.median_ms / merged.median_ms:.2f}x"
        )
    seconds = [run.seconds for run in runs.values()]
    print(
        f"trainings: {len(seconds)}, {statistics.fmean(seconds):.0f} s each on average ({args.jobs} at once); "
        f"wall time {time.perf_counter() - t_start:.0f} s; runs in {work}"
    )
    return 0 if all(run.ok for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
