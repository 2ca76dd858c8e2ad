"""The quickstart recipe over several seeds: validation top-1 before pruning and at the end, and the time it takes.

Run: ``python benchmarks/quickstart_seeds.py [--config configs/quickstart.yaml] [--seeds 0 1 2] [--train-only]
[-- --trainer.max_epochs=30 ...]`` (flags after ``--`` go to every ``train.py`` run).

Each seed is one ``python train.py fit`` as a user runs it (the recipe's own callbacks, logger, data), with
``OMP_NUM_THREADS`` left to the machine; a small callback records ``val/top1`` after every epoch. ``--train-only``
drops the fit-end callbacks (quantization, export, report) to study the training alone. Printed per seed: top-1 of
the last dense epoch (the one before ``StructuredPruning(at_epoch=K)``, or ``SparsityGates(prune_epoch=K)``), the
best dense top-1, the final top-1, the wall time of the whole job; then the CPU and the worst case over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _common import FIT_END, REPO, cpu_info, drop_callbacks, run_recipe


def _prune_epoch(recipe: dict) -> int | None:
    for callback in recipe["trainer"].get("callbacks") or []:
        args = callback.get("init_args") or {}
        for key in ("at_epoch", "prune_epoch"):
            if key in args:
                return int(args[key])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-only", action="store_true", help="drop the fit-end callbacks")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # train.py flags start with "--" themselves
    parser.epilog = "Flags after a lone -- go to every train.py run, e.g. -- --trainer.max_epochs=30"
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.set = extra
    recipe = yaml.safe_load(Path(args.config).read_text())
    if args.train_only:
        recipe = drop_callbacks(recipe, FIT_END)
    prune_epoch = _prune_epoch(recipe)
    cpu = cpu_info()
    print(f"CPU: {cpu.describe()} | ISA: {cpu.isa()}")
    print(f"config: {args.config}{' (train only)' if args.train_only else ''} {' '.join(args.set)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pqv-seeds-") as work:
        for seed in args.seeds:
            run = run_recipe(recipe, seed, Path(work) / f"seed{seed}", args.set)
            seconds = run.seconds
            if not run.ok:
                print(f"seed {seed}: failed (rc {run.returncode}): {run.stderr_tail}")
                continue
            top1 = run.top1
            dense = top1[:prune_epoch] if prune_epoch else top1
            row = {
                "seed": seed,
                "before_pruning": dense[-1] * 100,
                "best_dense": max(dense) * 100,
                "final": top1[-1] * 100,
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"seed {seed}: top-1 before pruning (epoch {len(dense) - 1}) {row['before_pruning']:.2f}%, best dense "
                f"{row['best_dense']:.2f}%, final {row['final']:.2f}%; {seconds:.0f} s"
            )
    if rows:
        worst = {k: min(r[k] for r in rows) for k in ("before_pruning", "final")}
        mean = {k: statistics.fmean(r[k] for r in rows) for k in ("before_pruning", "final", "seconds")}
        print(
            f"worst over {len(rows)} seeds: before pruning {worst['before_pruning']:.2f}%, final "
            f"{worst['final']:.2f}%; mean {mean['before_pruning']:.2f}% / {mean['final']:.2f}%, "
            f"{mean['seconds']:.0f} s a run"
        )
    return 0 if len(rows) == len(args.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
