"""The sweep's combined table and plots: the counterparts of PQV-Mobile's figures 2, 4, 5 and 7.

Reads only the finished points' results (plain data, as written to ``points/<id>/result.json``), so a sweep
spread over many machines is summarised the same way as one run on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pqv_lightning.apps.sweep_spec import SweepSpec
from pqv_lightning.report import cpu_description, format_number, new_figure, plain_log_ticks, save_figure
from pqv_lightning.utils.io import atomic_write_bytes, write_json

__all__ = ["SWEEP_PLOTS", "summarize"]

SWEEP_PLOTS = ("latency_memory_vs_pruning", "accuracy_vs_pruning", "accuracy_per_criterion", "latency_per_backend")


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


def _tokens_r(result: dict[str, Any]) -> int:
    """Tokens removed per block at a point (0 without token reduction, and for results written before the axis)."""
    return int((result.get("tokens") or {}).get("r", 0))


def _tokens_line(result: dict[str, Any]) -> str:
    counts = (result.get("tokens") or {}).get("tokens_per_block")
    return "-" if not counts else f"{counts[0]} → {counts[-1]}"


def summarize(results: Sequence[dict[str, Any]], spec: SweepSpec, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``sweep.md`` and ``sweep.json`` (one row per grid point x variant) and the four sweep plots."""
    out = Path(out)
    results = sorted(results, key=lambda r: (r["ratio"], r["importance"] or "", _tokens_r(r)))
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
        "| point | ratio % | criterion | tokens r | tokens per block | params M | MMACs | float top-1 % "
        "| fp32 eager ms | fastest file | ms | top-1 % | size MiB | peak RSS MiB |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        eager = next((v for v in r["variants"] if v["runtime"] == "eager" and v["precision"] == "fp32"), {})
        best = _fastest_file(r) or {}
        cells = [
            r["id"],
            f"{r['ratio'] * 100:g}",
            r["importance"] or "-",
            str(_tokens_r(r)),
            _tokens_line(r),
            format_number(eager.get("params"), ".3f", 1e-6),
            format_number(eager.get("macs"), ".1f", 1e-6),
            format_number(eager.get("top1"), ".2f", 100),
            format_number(_ms(eager or None), ".3f"),
            best.get("name", "-"),
            format_number(_ms(best or None), ".3f"),
            format_number(best.get("top1"), ".2f", 100),
            format_number(best.get("size_bytes"), ".2f", 1 / 2**20),
            format_number(best.get("peak_rss_bytes"), ".0f", 1 / 2**20),
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

    fig, (ax_lat, ax_mem) = new_figure(12, 7.5, ncols=2)
    criterion, line = next(iter(_by_criterion(results).items()))
    ratios = [r["ratio"] * 100 for r in line]
    colors = colormaps["tab20"]
    for i, name in enumerate(names):
        ax_lat.plot(ratios, [_ms(_variant(r, name)) for r in line], marker="o", color=colors(i % 20), label=name)
    ax_lat.set_yscale("log")
    plain_log_ticks(ax_lat.yaxis)
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
    fig, ax = new_figure()
    for i, (criterion, line) in enumerate(_by_criterion(results).items()):
        color = f"C{i}"
        ratios = [r["ratio"] * 100 for r in line]
        eager = [next(v["top1"] * 100 for v in r["variants"] if v["runtime"] == "eager") for r in line]
        ax.plot(ratios, eager, marker="o", color=color, label=f"{criterion}: float")
        fastest = [(_fastest_file(r) or {}).get("top1") for r in line]
        ax.plot(
            ratios,
            [None if a is None else a * 100 for a in fastest],
            marker="x",
            linestyle="--",
            color=color,
            label=f"{criterion}: fastest verified file",
        )
    ax.set_xlabel("channels pruned (%)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Accuracy vs pruning (after finetuning)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return fig


def _plot_accuracy_per_criterion(results: Sequence[dict[str, Any]], names: list[str]):
    """PQV-Mobile figure 5: top-1 per importance criterion, grouped by pruning ratio."""
    fig, ax = new_figure()
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
    fig, ax = new_figure(10, 5)
    line = next(iter(_by_criterion(results).values()))
    width = 0.8 / max(1, len(line))
    for i, r in enumerate(line):
        ax.barh(
            [k + i * width for k in range(len(names))],
            [_ms(_variant(r, n)) or 0 for n in names],
            width,
            label=f"{r['ratio'] * 100:g}% pruned",
            edgecolor="black",
            linewidth=0.3,
        )
    ax.set_yticks(
        [k + width * (len(line) - 1) / 2 for k in range(len(names))],
        [n.removeprefix("model_") for n in names],
        fontsize=7,
    )
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("latency per image, batch 1 (ms, median, log scale)")
    ax.set_title("Latency per runtime and backend, by pruning ratio", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig
