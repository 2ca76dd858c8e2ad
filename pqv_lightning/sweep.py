"""Sweep a grid of pruning ratios x importance criteria, each quantized and exported to every backend, and
tabulate and plot the trade-off: the counterparts of PQV-Mobile's figures 2, 4, 5 and 7.

One dense model is trained once (``dense_epochs`` of the base recipe) and cached; every grid point starts from
it, prunes at fit start (:class:`StructuredPruning`), finetunes ``finetune_epochs`` (with distillation from the
dense model unless disabled), then :class:`Quantization`, :class:`MobileExport` and :class:`TradeoffReport`
run as in any fit. Each finished point writes ``points/<id>/result.json`` atomically; an interrupted sweep run
again with the same spec skips the finished points and reuses the dense model (a changed spec is refused
rather than mixed with old results, unless ``--fresh``).

    pqv-sweep --config configs/sweep_digits.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pqv_lightning._io import atomic_write, atomic_write_bytes, write_json
from pqv_lightning.export import EXECUTORCH_PRECISIONS, ONNX_PRECISIONS, validate_formats, validate_precisions
from pqv_lightning.pruning import PruningSpec
from pqv_lightning.report import _figure, _fmt, _plain_ticks, cpu_description, save_figure

__all__ = ["SweepSpec", "grid", "load_spec", "main", "run_sweep", "summarize"]

SPEC_KEYS = (
    "base",
    "output_dir",
    "seed",
    "dense_epochs",
    "finetune_epochs",
    "ratios",
    "importances",
    "distillation",
    "quantization",
    "export",
    "report",
    "calibration_batches",
)
_PRUNING_FIELDS = ("ratio", "params_before", "params_after", "macs_before", "macs_after")
SWEEP_PLOTS = ("latency_memory_vs_pruning", "accuracy_vs_pruning", "accuracy_per_criterion", "latency_per_backend")


@dataclass
class SweepSpec:
    """What a sweep runs. ``base`` is a training recipe (``configs/*.yaml``) whose model and data are used."""

    base: str
    output_dir: str
    seed: int = 0
    dense_epochs: int = 25
    finetune_epochs: int = 10
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.09375, 0.25, 0.5])
    importances: list[str] = field(default_factory=lambda: ["l1", "l2", "taylor", "hessian"])
    distillation: dict[str, Any] | None = field(
        default_factory=lambda: {"mode": "soft", "temperature": 4.0, "alpha": 0.5}
    )
    quantization: list[str] = field(default_factory=lambda: ["fp16", "int8_dynamic:x86", "int8_pt2e:xnnpack"])
    export: dict[str, Any] = field(
        default_factory=lambda: {
            "formats": ["torchscript", "executorch", "onnx"],
            "executorch_precisions": ["fp32", "int8"],
            "onnx_precisions": ["fp32", "int8"],
        }
    )
    report: dict[str, Any] = field(default_factory=lambda: {"threads": 1, "runs": 30, "batch": 16, "memory": True})
    calibration_batches: int = 8

    def fingerprint(self) -> str:
        """What results depend on (not where they are written): finished points count only under the same."""
        doc = {k: v for k, v in asdict(self).items() if k != "output_dir"}
        doc["base_recipe"] = Path(self.base).read_text() if Path(self.base).is_file() else self.base
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= {minimum}")
    return value


def validate_spec(spec: SweepSpec) -> SweepSpec:
    """Check every field before anything trains; raise naming the bad value and what is accepted."""
    from pqv_lightning.callbacks.quantization import parse_targets
    from pqv_lightning.callbacks.report import TradeoffReport
    from pqv_lightning.distillation import validate as validate_distillation

    if not Path(spec.base).is_file():
        raise FileNotFoundError(
            f"base={spec.base!r}: no such recipe file; accepted: a path like configs/quickstart.yaml"
        )
    _int_at_least("seed", spec.seed, 0)
    _int_at_least("dense_epochs", spec.dense_epochs, 1)
    _int_at_least("finetune_epochs", spec.finetune_epochs, 1)
    _int_at_least("calibration_batches", spec.calibration_batches, 1)
    if not spec.ratios or not isinstance(spec.ratios, list):
        raise ValueError(f"ratios={spec.ratios!r} is invalid; accepted: a non-empty list of numbers in [0, 1)")
    for ratio in spec.ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio {ratio!r} in ratios is invalid; accepted: a number in [0, 1)")
    if any(r > 0 for r in spec.ratios):
        if not spec.importances:
            raise ValueError("importances=[] is invalid: ratios > 0 need at least one importance criterion")
        for importance in spec.importances:
            PruningSpec(ratio=0.5, importance=importance)  # raises naming the accepted criteria
    if spec.distillation is not None:
        unknown = set(spec.distillation) - {"mode", "temperature", "alpha"}
        if unknown:
            raise ValueError(f"distillation keys {sorted(unknown)} are invalid; accepted: mode, temperature, alpha")
        d = {"mode": "soft", "temperature": 4.0, "alpha": 0.5, **spec.distillation}
        validate_distillation(d["mode"], d["temperature"], d["alpha"])
    parse_targets(spec.quantization, spec.calibration_batches)
    unknown = set(spec.export) - {"formats", "executorch_precisions", "onnx_precisions"}
    if unknown:
        raise ValueError(
            f"export keys {sorted(unknown)} are invalid; accepted: formats, executorch_precisions, onnx_precisions"
        )
    validate_formats(spec.export.get("formats", ["torchscript", "executorch", "onnx"]))
    validate_precisions(spec.export.get("executorch_precisions", ["fp32"]), EXECUTORCH_PRECISIONS, "executorch")
    validate_precisions(spec.export.get("onnx_precisions", ["fp32"]), ONNX_PRECISIONS, "onnx")
    unknown = set(spec.report) - {"threads", "warmup", "runs", "batch", "memory"}
    if unknown:
        raise ValueError(f"report keys {sorted(unknown)} are invalid; accepted: threads, warmup, runs, batch, memory")
    TradeoffReport(**spec.report)  # same checks as the callback
    return spec


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a sweep YAML (keys of :class:`SweepSpec`; ``base`` relative to the YAML's folder's parent if needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {str(path)!r} does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"sweep config {str(path)!r} must be a mapping of {', '.join(SPEC_KEYS)}")
    doc.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(doc) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown sweep keys {sorted(unknown)} in {str(path)!r}; accepted: {', '.join(SPEC_KEYS)}")
    for key in ("base", "output_dir"):
        if key not in doc:
            raise ValueError(f"sweep config {str(path)!r} lacks {key!r}")
    base = Path(doc["base"])
    if not base.is_absolute() and not base.is_file() and (path.parent.parent / base).is_file():
        doc["base"] = str(path.parent.parent / base)
    return validate_spec(SweepSpec(**doc))


def grid(spec: SweepSpec) -> list[tuple[str, float, str | None]]:
    """``(id, ratio, importance)`` per grid point; ratio 0 (no pruning) is one point whatever the criteria."""
    points: list[tuple[str, float, str | None]] = []
    for ratio in spec.ratios:
        if ratio == 0:
            points.append(("dense", 0.0, None))
        else:
            points += [(f"r{ratio:g}_{imp}", float(ratio), imp) for imp in spec.importances]
    return points


# --------------------------------------------------------------------------- running


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


def _trainer(epochs: int, callbacks: list, logger: Any = False):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


class _RunBar:
    """A Lightning callback driving one tqdm bar through a grid point's steps and end-of-fit phases."""

    def __new__(cls, bar: Any):
        from lightning.pytorch.callbacks import Callback

        class RunBar(Callback):
            def on_train_batch_end(self, trainer, *args: Any) -> None:
                bar.update(1)

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                top1 = trainer.callback_metrics.get("val/top1")
                if top1 is not None:
                    bar.set_postfix_str(f"epoch {trainer.current_epoch + 1} val top-1 {float(top1) * 100:.2f}%")

            def on_fit_end(self, trainer, pl_module) -> None:
                bar.set_postfix_str("quantize, export, measure")

        return RunBar()


def _dense_weights(spec: SweepSpec, recipe: dict, out: Path, bar_factory: Any) -> dict[str, torch.Tensor]:
    import lightning.pytorch as pl

    path = out / "dense.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    pl.seed_everything(spec.seed, workers=True)
    module, data = _instantiate(recipe["model"]), _instantiate(recipe["data"])
    data.setup("fit")
    steps = spec.dense_epochs * len(data.train_dataloader())
    with bar_factory(total=steps, desc="dense warm-up", position=1, leave=False) as bar:
        _trainer(spec.dense_epochs, [_RunBar(bar)]).fit(module, datamodule=data)
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return state


def _run_point(
    spec: SweepSpec, recipe: dict, dense: dict[str, torch.Tensor], point: tuple[str, float, str | None], out: Path, bar
) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from pqv_lightning.callbacks import (
        KnowledgeDistillation,
        MobileExport,
        Quantization,
        StructuredPruning,
        TradeoffReport,
    )

    point_id, ratio, importance = point
    folder = out / "points" / point_id
    if folder.exists():  # leftovers of an interrupted attempt: start this point clean
        shutil.rmtree(folder)
    pl.seed_everything(spec.seed, workers=True)
    module, data = _instantiate(recipe["model"]), _instantiate(recipe["data"])
    module.model.load_state_dict(dense)
    data.setup("fit")
    bar.reset(total=spec.finetune_epochs * len(data.train_dataloader()))
    callbacks: list = []
    if ratio > 0:
        callbacks.append(
            StructuredPruning(ratio=ratio, importance=importance, calibration_batches=spec.calibration_batches)
        )
    if spec.distillation is not None:
        callbacks.append(KnowledgeDistillation(**spec.distillation))
    report = TradeoffReport(output_dir=folder / "report", profile=None, include_dense=False, **spec.report)
    export = MobileExport(output_dir=folder / "artifacts", calibration_batches=spec.calibration_batches, **spec.export)
    callbacks += [Quantization(spec.quantization, calibration_batches=spec.calibration_batches), export, report]
    logger = TensorBoardLogger(str(out / "tensorboard"), name=point_id, version=0)
    start = time.perf_counter()
    trainer = _trainer(spec.finetune_epochs, [*callbacks, _RunBar(bar)], logger)
    trainer.fit(module, datamodule=data)
    if report.error is not None:
        raise RuntimeError(f"grid point {point_id}: the trade-off report failed: {report.error}")
    pruned = callbacks[0].result if ratio > 0 else None
    return {
        "id": point_id,
        "ratio": ratio,
        "importance": importance,
        "pruning": None if pruned is None else {k: getattr(pruned, k) for k in _PRUNING_FIELDS},
        "val_top1": float(trainer.callback_metrics["val/top1"]),
        "seconds": round(time.perf_counter() - start, 1),
        "variants": [p.as_dict() for p in report.points],
    }


def run_sweep(spec: SweepSpec, fresh: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; return one result per grid point and write the combined table and plots."""
    from tqdm.auto import tqdm

    validate_spec(spec)
    out = Path(spec.output_dir)
    stamp = out / "sweep_spec.json"
    fingerprint = spec.fingerprint()
    if fresh and out.exists():
        shutil.rmtree(out)
    if stamp.is_file():
        previous = json.loads(stamp.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise ValueError(
                f"{out} holds a sweep with another spec (fingerprint {previous} != {fingerprint}); use a new "
                "output_dir, or --fresh to delete it and start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fingerprint, "spec": asdict(spec)})
    recipe = _recipe(spec)

    def bar_factory(**kwargs: Any):
        return tqdm(disable=not progress, dynamic_ncols=True, **kwargs)

    points = grid(spec)
    results: list[dict[str, Any]] = []
    # Each point's tables are in its report files; on the console, the bars (and warnings) say enough.
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pqv_lightning")]
    levels = [logger.level for logger in loggers]
    if progress:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        _run_points(spec, recipe, points, out, results, bar_factory)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    summarize(results, spec, out)
    return results


def _run_points(
    spec: SweepSpec, recipe: dict, points: list, out: Path, results: list[dict[str, Any]], bar_factory: Any
) -> None:
    with bar_factory(total=len(points), desc="sweep", position=0) as overall:
        dense: dict[str, torch.Tensor] | None = None
        for point in points:
            result_path = out / "points" / point[0] / "result.json"
            if result_path.is_file():
                results.append(json.loads(result_path.read_text()))
                overall.set_postfix_str(f"{point[0]} done earlier (resumed)")
                overall.update(1)
                continue
            if dense is None:
                dense = _dense_weights(spec, recipe, out, bar_factory)
            overall.set_postfix_str(point[0])
            with bar_factory(total=None, desc=point[0], position=1, leave=False) as bar:
                result = _run_point(spec, recipe, dense, point, out, bar)
            write_json(result_path, result)
            results.append(result)
            overall.update(1)


# --------------------------------------------------------------------------- combined table and plots


def _key(name: str) -> str:
    """A variant's name across grid points: the eager float model is "float ..." unpruned, "pruned ..." pruned."""
    return name.removeprefix("pruned ").removeprefix("float ")


def _variant(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in result["variants"] if _key(v["name"]) == name), None)


def _ms(v: dict[str, Any] | None) -> float | None:
    return None if v is None or v.get("latency") is None else v["latency"]["median_ms"]


def _measured_names(results: Sequence[dict[str, Any]]) -> list[str]:
    """Variant names measured in every grid point (the same set of backends across the sweep)."""
    names: list[str] | None = None
    for r in results:
        here = [_key(v["name"]) for v in r["variants"] if v.get("latency") is not None]
        names = here if names is None else [n for n in names if n in here]
    return names or []


def _fastest_file(result: dict[str, Any]) -> dict[str, Any] | None:
    files = [v for v in result["variants"] if v.get("path") and v.get("latency") and v["status"] == "ok"]
    return min(files, key=_ms, default=None)


def summarize(results: Sequence[dict[str, Any]], spec: SweepSpec, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``sweep.md`` and ``sweep.json`` (one row per grid point x variant) and the four sweep plots."""
    out = Path(out)
    results = sorted(results, key=lambda r: (r["ratio"], r["importance"] or ""))
    threads = spec.report.get("threads", 1)
    lines = [
        f"# Sweep: {Path(spec.base).name}, {len(results)} grid points",
        "",
        f"- Dense model: {spec.dense_epochs} epochs; each point: prune at fit start, {spec.finetune_epochs} epochs "
        f"finetuning{' with distillation from the dense model' if spec.distillation else ''}, then quantization "
        "and export of every format, each verified in its own runtime.",
        f"- Measured on {cpu_description()}, {threads} thread(s) per runtime, batch 1, median of "
        f"{spec.report.get('runs', 50)} timed calls; top-1 on the validation split through each runtime.",
        "",
        "| point | ratio % | criterion | params M | MMACs | float top-1 % | fp32 eager ms | fastest file | ms "
        "| top-1 % | size MiB | peak RSS MiB |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        eager = next((v for v in r["variants"] if v["runtime"] == "eager" and v["precision"] == "fp32"), {})
        best = _fastest_file(r) or {}
        cells = [
            r["id"],
            f"{r['ratio'] * 100:g}",
            r["importance"] or "-",
            _fmt(eager.get("params"), ".3f", 1e-6),
            _fmt(eager.get("macs"), ".1f", 1e-6),
            _fmt(eager.get("top1"), ".2f", 100),
            _fmt(_ms(eager or None), ".3f"),
            best.get("name", "-"),
            _fmt(_ms(best or None), ".3f"),
            _fmt(best.get("top1"), ".2f", 100),
            _fmt(best.get("size_bytes"), ".2f", 1 / 2**20),
            _fmt(best.get("peak_rss_bytes"), ".0f", 1 / 2**20),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    names = _measured_names(results)
    lines += ["", "## Batch-1 latency (ms) of every variant measured in every point", ""]
    lines.append("| point | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for r in results:
        lines.append(f"| {r['id']} | " + " | ".join(f"{_ms(_variant(r, n)):.3f}" for n in names) + " |")
    plots: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for name, draw in (
        ("latency_memory_vs_pruning", _plot_latency_memory),
        ("accuracy_vs_pruning", _plot_accuracy_vs_pruning),
        ("accuracy_per_criterion", _plot_accuracy_per_criterion),
        ("latency_per_backend", _plot_latency_per_backend),
    ):
        try:
            plots[name] = save_figure(draw(results, names), out / f"{name}.png")
        except Exception as err:  # a plot is a view of the table: never lose the table to it
            errors[name] = f"{type(err).__name__}: {err}"
    lines += ["", "## Plots", ""] + [f"![{n}]({p.name})" for n, p in plots.items()]
    atomic_write_bytes(out / "sweep.md", ("\n".join(lines) + "\n").encode())
    write_json(
        out / "sweep.json",
        {"spec": asdict(spec), "cpu": cpu_description(), "points": list(results), "plot_errors": errors},
    )
    return {"markdown": out / "sweep.md", "json": out / "sweep.json", **plots}


def _by_criterion(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each criterion's points by ratio, the unpruned point (ratio 0) at the start of every line."""
    dense = [r for r in results if r["ratio"] == 0]
    criteria = sorted({r["importance"] for r in results if r["importance"]})
    return {
        c: dense + sorted((r for r in results if r["importance"] == c), key=lambda r: r["ratio"]) for c in criteria
    } or {"none": dense}


def _plot_latency_memory(results: Sequence[dict[str, Any]], names: list[str]):
    """PQV-Mobile figure 2: latency and memory against the pruning ratio (first criterion; latency hardly
    depends on the criterion under uniform pruning)."""
    from matplotlib import colormaps

    fig, (ax_lat, ax_mem) = _figure(12, 7.5, ncols=2)
    criterion, line = next(iter(_by_criterion(results).items()))
    ratios = [r["ratio"] * 100 for r in line]
    colors = colormaps["tab20"]
    for i, name in enumerate(names):
        ax_lat.plot(ratios, [_ms(_variant(r, name)) for r in line], marker="o", color=colors(i % 20), label=name)
    ax_lat.set_yscale("log")
    _plain_ticks(ax_lat.yaxis)
    ax_lat.set_xlabel("channels pruned (%)")
    ax_lat.set_ylabel("latency per image, batch 1 (ms, median)")
    ax_lat.set_title(f"Latency vs pruning ({criterion})", fontsize=10)
    ax_lat.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax_lat.grid(True, which="both", alpha=0.3)
    files = [n for n in names if any((_variant(r, n) or {}).get("peak_rss_bytes") for r in line)]
    for name in files:
        rss = [(_variant(r, name) or {}).get("peak_rss_bytes") for r in line]
        base = [(_variant(r, name) or {}).get("runtime_rss_bytes") for r in line]
        model_share = [None if a is None or b is None else (a - b) / 2**20 for a, b in zip(rss, base, strict=True)]
        color = colors(names.index(name) % 20)
        ax_mem.plot(ratios, model_share, marker="o", color=color, label=f"{name}: peak RSS - runtime")
        sizes = [(_variant(r, name) or {}).get("size_bytes") for r in line]
        sizes_mib = [s / 2**20 if s else None for s in sizes]
        ax_mem.plot(ratios, sizes_mib, marker="x", linestyle=":", color=color, label=f"{name}: file")
    ax_mem.set_xlabel("channels pruned (%)")
    ax_mem.set_ylabel("memory (MiB)")
    ax_mem.set_title("Memory vs pruning: model's share of peak RSS (solid), file size (dotted)", fontsize=9)
    if files:
        ax_mem.legend(fontsize=5.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax_mem.text(0.5, 0.5, "memory not measured (report.memory: false)", ha="center", transform=ax_mem.transAxes)
    ax_mem.grid(True, alpha=0.3)
    return fig


def _plot_accuracy_vs_pruning(results: Sequence[dict[str, Any]], names: list[str]):
    """PQV-Mobile figure 4: validation top-1 against the pruning ratio, one line per criterion, for the float
    model (solid) and its fastest verified file (dashed)."""
    fig, ax = _figure()
    for i, (criterion, line) in enumerate(_by_criterion(results).items()):
        color = f"C{i}"
        ratios = [r["ratio"] * 100 for r in line]
        eager = [next(v["top1"] * 100 for v in r["variants"] if v["runtime"] == "eager") for r in line]
        ax.plot(ratios, eager, marker="o", color=color, label=f"{criterion}: float")
        fastest = [(_fastest_file(r) or {}).get("top1") for r in line]
        ax.plot(ratios, [None if a is None else a * 100 for a in fastest], marker="x", linestyle="--", color=color,
                label=f"{criterion}: fastest verified file")  # fmt: skip
    ax.set_xlabel("channels pruned (%)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Accuracy vs pruning (after finetuning)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return fig


def _plot_accuracy_per_criterion(results: Sequence[dict[str, Any]], names: list[str]):
    """PQV-Mobile figure 5: top-1 per importance criterion, grouped by pruning ratio."""
    fig, ax = _figure()
    pruned = [r for r in results if r["ratio"] > 0]
    ratios = sorted({r["ratio"] for r in pruned})
    criteria = sorted({r["importance"] for r in pruned})
    width = 0.8 / max(1, len(criteria))
    for i, criterion in enumerate(criteria):
        values = []
        for ratio in ratios:
            match = next((r for r in pruned if r["ratio"] == ratio and r["importance"] == criterion), None)
            eager = None if match is None else next(v for v in match["variants"] if v["runtime"] == "eager")
            values.append(0 if eager is None else eager["top1"] * 100)
        ax.bar(
            [k + i * width for k in range(len(ratios))],
            values,
            width,
            label=criterion,
            edgecolor="black",
            linewidth=0.4,
        )
    dense = next((r for r in results if r["ratio"] == 0), None)
    if dense is not None:
        top1 = next(v["top1"] for v in dense["variants"] if v["runtime"] == "eager") * 100
        ax.axhline(top1, color="black", linestyle="--", linewidth=1, label=f"unpruned ({top1:.2f}%)")
    ax.set_xticks([k + width * (len(criteria) - 1) / 2 for k in range(len(ratios))], [f"{r * 100:g}%" for r in ratios])
    low = min((b.get_height() for b in ax.patches if b.get_height() > 0), default=0)
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_xlabel("channels pruned")
    ax.set_ylabel("validation top-1 of the finetuned float model (%)")
    ax.set_title("Accuracy per importance criterion", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def _plot_latency_per_backend(results: Sequence[dict[str, Any]], names: list[str]):
    """PQV-Mobile figure 7: batch-1 latency of every runtime/backend variant, grouped by pruning ratio."""
    fig, ax = _figure(10, 5)
    line = next(iter(_by_criterion(results).values()))
    width = 0.8 / max(1, len(line))
    for i, r in enumerate(line):
        ax.barh([k + i * width for k in range(len(names))], [_ms(_variant(r, n)) or 0 for n in names], width,
                label=f"{r['ratio'] * 100:g}% pruned", edgecolor="black", linewidth=0.3)  # fmt: skip
    ax.set_yticks(
        [k + width * (len(line) - 1) / 2 for k in range(len(names))],
        [n.removeprefix("model_") for n in names],
        fontsize=7,
    )
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("latency per image, batch 1 (ms, median, log scale)")
    ax.set_title("Latency per runtime and backend, by pruning ratio", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqv-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweep_digits.yaml")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--dense-epochs", type=int, help="override dense_epochs")
    parser.add_argument("--finetune-epochs", type=int, help="override finetune_epochs")
    parser.add_argument("--ratios", type=float, nargs="+", help="override ratios")
    parser.add_argument("--importances", nargs="+", help="override importances")
    parser.add_argument("--fresh", action="store_true", help="delete output_dir first instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    overrides = {
        "output_dir": args.output_dir,
        "dense_epochs": args.dense_epochs,
        "finetune_epochs": args.finetune_epochs,
        "ratios": args.ratios,
        "importances": args.importances,
    }
    try:
        spec = load_spec(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        run_sweep(spec, fresh=args.fresh, progress=not args.no_progress)
    except ValueError as err:
        print(f"pqv-sweep: error: {err}", file=sys.stderr)
        return 2
    out = Path(spec.output_dir)
    print(f"sweep done in {time.perf_counter() - start:.0f}s: {out / 'sweep.md'}")
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
