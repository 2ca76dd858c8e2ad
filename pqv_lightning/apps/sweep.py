"""``pqv-sweep``: a grid of pruning ratios x importance criteria, each quantized and exported to every backend,
tabulated and plotted: the counterparts of PQV-Mobile's figures 2, 4, 5 and 7.

One dense model is trained once (``dense_epochs`` of the base recipe) and cached; every grid point starts from
it, is pruned (:func:`pqv_lightning.pruning.prune`), finetuned ``finetune_epochs`` (with distillation from the
dense model unless disabled), then quantized, exported and measured by the fit-end pipeline
(:func:`pqv_lightning.pipeline.run_pipeline`). Each finished point writes ``points/<id>/result.json`` atomically;
an interrupted sweep run again with the same spec skips the finished points and reuses the dense model (a changed
spec is refused rather than mixed with old results, unless ``--fresh``).

    pqv-sweep --config configs/sweep_digits.yaml     (or the packaged recipe by name: --config sweep_digits)

A sweep that outgrows one machine runs one grid point per job of an existing scheduler (a Slurm job array, say):
``--prepare`` trains and caches the dense model once, ``--list`` prints the points, ``--point ID`` (or its index)
runs one, ``--merge`` writes the combined table and plots from the finished points (see the README).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from pqv_lightning.apps.sweep_spec import SweepSpec, grid, load_spec, validate_spec
from pqv_lightning.apps.sweep_summary import SWEEP_PLOTS, summarize
from pqv_lightning.apps.trainers import quiet_trainer
from pqv_lightning.checkpoint import CheckpointError, read_checkpoint, set_structure
from pqv_lightning.distillation import Distiller, attach_distiller, detach_distiller, frozen_copy
from pqv_lightning.latency_search import LatencyTarget, search_ratio, trials_of
from pqv_lightning.pipeline import run_pipeline
from pqv_lightning.pruning import PruningSpec, prune
from pqv_lightning.recipes import find_recipe, resolve_reference
from pqv_lightning.tokens import TokenReduction, apply_token_reduction, tokens_per_block
from pqv_lightning.utils.batches import split_batch
from pqv_lightning.utils.io import atomic_write, write_json
from pqv_lightning.utils.progress import Progress

__all__ = ["SWEEP_PLOTS", "SweepSpec", "grid", "load_spec", "main", "merge", "run_point", "run_sweep", "summarize"]

SPEC_FILE = "sweep_spec.json"
_PRUNING_FIELDS = ("ratio", "params_before", "params_after", "macs_before", "macs_after")
Point = tuple[str, float | None, str | None]


def _instantiate(section: dict[str, Any]) -> Any:
    module_name, _, class_name = section["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**section.get("init_args", {}))


def _recipe(spec: SweepSpec) -> dict[str, Any]:
    recipe = yaml.safe_load(Path(spec.base).read_text())
    for key in ("model", "data"):
        if not isinstance(recipe.get(key), dict) or "class_path" not in recipe[key]:
            raise ValueError(
                f"base recipe {spec.base!r} has no {key}.class_path: the sweep builds model and data from it"
            )
    return recipe


class _RunBar:
    """A Lightning callback driving one tqdm bar through a grid point's steps."""

    def __new__(cls, bar: Any):
        from lightning.pytorch.callbacks import Callback

        class RunBar(Callback):
            def on_train_batch_end(self, trainer, *args: Any) -> None:
                bar.update(1)

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                top1 = trainer.callback_metrics.get("val/top1")
                if top1 is not None:
                    bar.set_postfix_str(f"epoch {trainer.current_epoch + 1} val top-1 {float(top1) * 100:.2f}%")

        return RunBar()


def _dense_weights(spec: SweepSpec, recipe: dict, out: Path, bar_factory: Any) -> dict[str, torch.Tensor]:
    """The cached dense model (``out/dense.pt``, read weights-only), trained and written atomically if missing."""
    import lightning.pytorch as pl

    path = out / "dense.pt"
    if path.is_file():
        try:
            state = read_checkpoint(path, "the sweep's cached dense model (a state dict written by pqv-sweep)")
        except CheckpointError as err:
            raise CheckpointError(f"{err} Delete it to retrain the dense model.") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{str(path)!r} is not a state dict of tensors: delete it to retrain the dense model")
        return state
    pl.seed_everything(spec.seed, workers=True)
    module, data = _instantiate(recipe["model"]), _instantiate(recipe["data"])
    data.setup("fit")
    steps = spec.dense_epochs * len(data.train_dataloader())
    with bar_factory(total=steps, desc="dense warm-up", position=1, leave=False) as bar:
        quiet_trainer(spec.dense_epochs, [_RunBar(bar)], num_sanity_val_steps=0).fit(module, datamodule=data)
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return state


def _prune_at_fit_start(spec: SweepSpec, module: Any, data: Any, ratio: float, importance: str) -> Any:
    """Prune the module's model before its fit, as ``StructuredPruning(at_epoch=0)`` does in ``setup``."""
    pruning = PruningSpec(ratio=ratio, importance=importance, calibration_batches=spec.calibration_batches)
    count = pruning.calibration_batches if pruning.data_driven else 1
    batches = [split_batch(b) for b in itertools.islice(iter(data.train_dataloader()), count)]
    result = prune(module.model, pruning, batches[0][0][:1], calibration=batches if pruning.data_driven else None)
    set_structure(module.model, result.structure)
    return result


def _search_latency(
    spec: SweepSpec,
    module: Any,
    data: Any,
    latency: LatencyTarget,
    importance: str,
    out: Path,
    tokens: TokenReduction | None = None,
):
    """The ratio of a latency point, searched on the dense model (its trials reducing ``tokens``, the point's token
    reduction); every measurement is cached by ratio in ``latency_trials.json`` (per target kind, threads and token
    reduction), for the other points and for a resumed sweep."""
    cache_path = out / "latency_trials.json"
    key = f"{latency.artifact}@{latency.threads}" + (f"+{tokens.method}{tokens.r}" if tokens else "")
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except (OSError, ValueError):  # a damaged cache only costs measurements
        cache = {}
    trials = trials_of(cache.get(key, []))
    x = split_batch(next(iter(data.train_dataloader())))[0]
    calibration = [x[i : i + 1] for i in range(min(8, x.shape[0]))]
    search = search_ratio(
        module.model,
        PruningSpec(ratio=0.0, importance=importance),
        x[:1],
        latency,
        calibration,
        trials=trials,
        progress=Progress("pqv-sweep", bar=False),
        tokens=tokens,
    )
    cache[key] = sorted([r, ms] for r, ms in trials.items())
    write_json(cache_path, cache)
    return search


def _run_point(spec: SweepSpec, recipe: dict, dense: dict[str, torch.Tensor], point: Point, out: Path, bar) -> dict:
    """Prune, finetune (distilling from the dense model), then quantize, export and measure one grid point."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    point_id, ratio, importance = point
    latency = spec.latency_target(point_id)
    tokens = spec.token_reduction(point_id)
    folder = out / "points" / point_id
    if folder.exists():  # leftovers of an interrupted attempt: start this point clean
        shutil.rmtree(folder)
    pl.seed_everything(spec.seed, workers=True)
    module, data = _instantiate(recipe["model"]), _instantiate(recipe["data"])
    module.model.load_state_dict(dense)
    data.setup("fit")
    bar.reset(total=spec.finetune_epochs * len(data.train_dataloader()))
    teacher = frozen_copy(module.model) if spec.distillation is not None else None
    search = None
    if latency is not None:
        bar.set_postfix_str(f"latency search: {latency.describe()}")
        search = _search_latency(spec, module, data, latency, importance, out, tokens)
        ratio = search.ratio
    pruned = _prune_at_fit_start(spec, module, data, ratio, importance) if ratio > 0 else None
    if tokens is not None:  # trained with the reduction from fit start, as TokenMerging(at_epoch=0) does
        apply_token_reduction(module.model, tokens)
    if teacher is not None:
        attach_distiller(module, Distiller(teacher, **spec.distillation))
    logger = TensorBoardLogger(str(out / "tensorboard"), name=point_id, version=0)
    start = time.perf_counter()
    trainer = quiet_trainer(spec.finetune_epochs, [_RunBar(bar)], logger, num_sanity_val_steps=0)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        detach_distiller(module)
    bar.set_postfix_str("quantize, export, measure")
    result = run_pipeline(
        module.model,
        data.val_dataloader(),
        data.train_dataloader(),
        quantization=spec.quantization_config(),
        export=spec.export_config(folder / "artifacts"),
        report=spec.report_config(folder / "report"),
        manifest_meta={"model": type(module.model).__name__, "grid_point": point_id},
        report_context={"epoch": trainer.current_epoch, "global_step": trainer.global_step},
    )
    if result.report_error is not None:
        raise RuntimeError(f"grid point {point_id}: the trade-off report failed: {result.report_error}")
    return {
        "id": point_id,
        "ratio": ratio,
        "importance": importance,
        "pruning": None if pruned is None else {k: getattr(pruned, k) for k in _PRUNING_FIELDS},
        "latency_search": None if search is None else search.as_dict(),
        "tokens": None if tokens is None else {**tokens.as_dict(), "tokens_per_block": tokens_per_block(module.model)},
        "val_top1": float(trainer.callback_metrics["val/top1"]),
        "seconds": round(time.perf_counter() - start, 1),
        "variants": [p.as_dict() for p in result.points],
    }


# --------------------------------------------------------------------------- the sweep folder


def _stamp(spec: SweepSpec, out: Path, fresh: bool) -> None:
    """Make ``out`` this sweep's folder: refuse another spec's results; ``fresh`` clears only a sweep folder."""
    stamp = out / SPEC_FILE
    if fresh and out.exists():
        if not stamp.is_file():
            raise ValueError(
                f"--fresh would delete {str(out)!r}, which holds no {SPEC_FILE} (it is not a pqv-sweep folder); "
                "accepted: a folder pqv-sweep wrote, or a new output_dir"
            )
        shutil.rmtree(out)
    fingerprint = spec.fingerprint()
    if stamp.is_file():
        try:
            previous = json.loads(stamp.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{str(stamp)!r} is damaged ({err}); use --fresh to start over") from None
        if previous != fingerprint:
            raise ValueError(
                f"{out} holds a sweep with another spec (fingerprint {previous} != {fingerprint}); use a new "
                "output_dir, or --fresh to delete it and start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fingerprint, "spec": asdict(spec)})


def _result_path(out: Path, point_id: str) -> Path:
    return out / "points" / point_id / "result.json"


def _finished(out: Path, point_id: str) -> dict[str, Any] | None:
    path = _result_path(out, point_id)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # written atomically, so only a damaged disk gets here: run the point again
        return None


@contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Each point's tables are in its report files; on the console, the bars (and warnings) say enough."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pqv_lightning")]
    levels = [logger.level for logger in loggers]
    if progress:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _bars(progress: bool):
    from tqdm.auto import tqdm

    def bar_factory(**kwargs: Any):
        return tqdm(disable=not progress, dynamic_ncols=True, **kwargs)

    return bar_factory


def _run_points(spec: SweepSpec, points: Sequence[Point], out: Path, progress: bool) -> list[dict[str, Any]]:
    """Run every point not finished yet (in order); return the results of all of them."""
    recipe = _recipe(spec)
    bar_factory = _bars(progress)
    results: list[dict[str, Any]] = []
    with _quiet(progress), bar_factory(total=len(points), desc="sweep", position=0) as overall:
        dense: dict[str, torch.Tensor] | None = None
        for point in points:
            done = _finished(out, point[0])
            if done is not None:
                results.append(done)
                overall.set_postfix_str(f"{point[0]} done earlier (resumed)")
                overall.update(1)
                continue
            if dense is None:
                dense = _dense_weights(spec, recipe, out, bar_factory)
            overall.set_postfix_str(point[0])
            with bar_factory(total=None, desc=point[0], position=1, leave=False) as bar:
                result = _run_point(spec, recipe, dense, point, out, bar)
            write_json(_result_path(out, point[0]), result)
            results.append(result)
            overall.update(1)
    return results


def run_sweep(spec: SweepSpec, fresh: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; return one result per grid point and write the combined table and plots."""
    validate_spec(spec)
    out = Path(spec.output_dir)
    _stamp(spec, out, fresh)
    results = _run_points(spec, grid(spec), out, progress)
    summarize(results, spec, out)
    return results


def point_of(spec: SweepSpec, selector: str) -> Point:
    """The grid point named ``selector``: its id (``r0.25_l2``) or its index in :func:`grid` order."""
    points = grid(spec)
    for point in points:
        if point[0] == selector:
            return point
    if selector.isdigit() and int(selector) < len(points):
        return points[int(selector)]
    accepted = ", ".join(f"{i}={p[0]}" for i, p in enumerate(points))
    raise ValueError(f"--point={selector!r} is invalid; accepted: a point id or index ({accepted})")


def prepare(spec: SweepSpec, progress: bool = True) -> Path:
    """Stamp the sweep folder and train (or check) the cached dense model, once, before the points run."""
    validate_spec(spec)
    out = Path(spec.output_dir)
    _stamp(spec, out, fresh=False)
    with _quiet(progress):
        _dense_weights(spec, _recipe(spec), out, _bars(progress))
    return out / "dense.pt"


def run_point(spec: SweepSpec, selector: str, progress: bool = True) -> dict[str, Any]:
    """Run one grid point (unless already finished) in this process; the other points are someone else's."""
    validate_spec(spec)
    point = point_of(spec, selector)
    out = Path(spec.output_dir)
    _stamp(spec, out, fresh=False)
    return _run_points(spec, [point], out, progress)[0]


def merge(spec: SweepSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """Summarise the finished points (``sweep.md``, ``sweep.json``, plots); return them and the missing ids."""
    validate_spec(spec)
    out = Path(spec.output_dir)
    stamp = out / SPEC_FILE
    if not stamp.is_file():
        raise ValueError(f"{str(out)!r} holds no {SPEC_FILE}: no point of this sweep has run there yet")
    _stamp(spec, out, fresh=False)  # refuses results of another spec
    results, missing = [], []
    for point_id, _, _ in grid(spec):
        done = _finished(out, point_id)
        if done is None:
            missing.append(point_id)
        else:
            results.append(done)
    if results:
        summarize(results, spec, out)
    return results, missing


# --------------------------------------------------------------------------- command line


def sweep_recipe(value: str) -> tuple[Path, str | None]:
    """The sweep YAML ``--config`` names (a file, else a packaged recipe by name) and its ``base`` found the same
    way (a packaged sweep, or one copied out of the package, names ``configs/<recipe>.yaml``); ``None`` for a
    ``base`` that :func:`load_spec` reads and reports as written."""
    config = find_recipe(value, "--config")
    try:
        doc = yaml.safe_load(config.read_text())
    except yaml.YAMLError:
        return config, None
    base = doc.get("base") if isinstance(doc, dict) else None
    return config, resolve_reference(base, config, "base") if isinstance(base, str) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqv-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="sweep YAML, e.g. configs/sweep_digits.yaml, or a packaged recipe's name"
    )
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--dense-epochs", type=int, help="override dense_epochs")
    parser.add_argument("--finetune-epochs", type=int, help="override finetune_epochs")
    parser.add_argument("--ratios", type=float, nargs="+", help="override ratios")
    parser.add_argument("--importances", nargs="+", help="override importances")
    parser.add_argument(
        "--latency-targets-ms", type=float, nargs="+", help="override latency_targets_ms (points pruned to a latency)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fresh", action="store_true", help="delete the sweep's output_dir first instead of resuming")
    mode.add_argument("--list", action="store_true", help="print the grid points (index and id) and exit")
    mode.add_argument("--prepare", action="store_true", help="train and cache the dense model only")
    mode.add_argument("--point", metavar="ID", help="run only this grid point (id or index, see --list)")
    mode.add_argument("--merge", action="store_true", help="write the table and plots of the finished points")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    overrides = {
        "output_dir": args.output_dir,
        "dense_epochs": args.dense_epochs,
        "finetune_epochs": args.finetune_epochs,
        "ratios": args.ratios,
        "importances": args.importances,
        "latency_targets_ms": args.latency_targets_ms,
    }
    try:
        config, overrides["base"] = sweep_recipe(args.config)
        spec = load_spec(config, overrides)
        if args.point is not None:
            point_of(spec, args.point)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    out = Path(spec.output_dir)
    progress = not args.no_progress
    start = time.perf_counter()
    try:
        if args.list:
            print("\n".join(f"{i}\t{point_id}" for i, (point_id, _, _) in enumerate(grid(spec))))
            return 0
        if args.prepare:
            print(f"dense model ready: {prepare(spec, progress)}")
            return 0
        if args.point is not None:
            result = run_point(spec, args.point, progress)
            print(f"grid point {result['id']} done: {_result_path(out, result['id'])}")
            return 0
        if args.merge:
            results, missing = merge(spec)
            if results:
                print((out / "sweep.md").read_text())
            if missing:
                print(
                    f"pqv-sweep: {len(missing)} of {len(grid(spec))} points not finished: {', '.join(missing)}",
                    file=sys.stderr,
                )
                return 1
            return 0
        run_sweep(spec, fresh=args.fresh, progress=progress)
    except ValueError as err:
        print(f"pqv-sweep: error: {err}", file=sys.stderr)
        return 2
    print(f"sweep done in {time.perf_counter() - start:.0f}s: {out / 'sweep.md'}")
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
