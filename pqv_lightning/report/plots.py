"""The trade-off plots, drawn on bare matplotlib Figures and saved atomically; the figure helpers are shared
with the sweep's plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqv_lightning.export.formats import list_formats
from pqv_lightning.measure import OpTime
from pqv_lightning.report.labels import place_labels
from pqv_lightning.report.tradeoff import TradeoffPoint
from pqv_lightning.utils.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PLOTS",
    "new_figure",
    "plain_log_ticks",
    "plot_accuracy_vs_latency",
    "plot_latency_per_backend",
    "plot_operator_profile",
    "plot_size_vs_accuracy",
    "save_figure",
]

PLOTS = ("accuracy_vs_latency", "size_vs_accuracy", "latency_per_backend", "operator_profile")


def _runtime_colors() -> dict[str, str]:
    """The colour of each runtime: the eager model's, and each registered format's own."""
    return {"eager": "#4c72b0", **{f.name: f.color for f in list_formats()}}


_NETWORK_MARKERS = {"dense": "s", "pruned": "o", "float": "o"}
_MIB = 2**20


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG atomically (no half-written image is ever visible)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return path


def new_figure(width: float = 8.0, height: float = 5.5, ncols: int = 1) -> tuple[Figure, Any]:
    """A bare Figure (no pyplot: no GUI backend, no global figure registry to leak into) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot() if ncols == 1 else fig.subplots(1, ncols)


def _label(p: TradeoffPoint) -> str:
    return p.name.removeprefix("model_")


def _is_reference(p: TradeoffPoint) -> bool:
    """The eager fp32 rows of the float (pruned) and dense networks: what every other variant is judged against."""
    return p.runtime == "eager" and p.precision == "fp32" and p.network in ("dense", "pruned", "float")


def _draw_front(ax: Any, front: Sequence[tuple[float, float]], label: str) -> None:
    """The front as a post-step line, drawn through its corners so that label placement sees the drawn path."""
    if not front:
        return
    xs, ys = [front[0][0]], [front[0][1]]
    for x, y in front[1:]:
        xs += [x, x]
        ys += [ys[-1], y]
    ax.plot(xs, ys, color="black", linestyle="--", linewidth=1, label=label, zorder=2)


def _smallest_for_accuracy(points: Sequence[TradeoffPoint]) -> list[TradeoffPoint]:
    """The files that no other file beats on size without losing accuracy, smallest first."""
    key = {id(p): (p.size_bytes, -p.top1) for p in points}
    front = [p for p in points if not any(key[id(q)] < key[id(p)] and q.top1 >= p.top1 for q in points)]
    return sorted(front, key=lambda p: key[id(p)])


# Where a label may go, as gaps (points) between its point's marker and its text. Near spots (no leader): around
# the marker in 8 directions. Far spots (with a leader line to the point): columns beside it and rows above and
# below it, stepped so that the labels of points close together can stack there.
def plain_log_ticks(axis: Any) -> None:
    """Log-scale ticks as plain numbers (0.2, 0.5, 1, 2), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def plot_accuracy_vs_latency(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """Top-1 vs batch-1 latency, colour = runtime, marker = network, the Pareto front as a line.

    Only the choices and the baselines are named (the Pareto front, then the eager fp32 float and dense
    references), with their latency and top-1; every other variant is a marker that the legend identifies and the
    report's table lists: two dozen names in a 2-5 ms cluster cannot all be read.
    """
    fig, ax = new_figure()
    shown = [p for p in points if p.latency_ms is not None and p.top1 is not None]
    for runtime, color in _runtime_colors().items():
        for network, marker in _NETWORK_MARKERS.items():
            group = [p for p in shown if p.runtime == runtime and p.network == network]
            if group:
                ax.scatter(
                    [p.latency_ms for p in group],
                    [p.top1 * 100 for p in group],
                    color=color,
                    marker=marker,
                    s=46,
                    label=f"{runtime} ({network})",
                    edgecolors="black",
                    linewidths=0.4,
                    zorder=3,
                )
    front = sorted((p for p in shown if p.pareto), key=lambda p: p.latency_ms)
    _draw_front(ax, [(p.latency_ms, p.top1 * 100) for p in front], "Pareto front")
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("latency per image, batch 1 (ms, median, log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Accuracy vs latency" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    references = [p for p in shown if _is_reference(p) and not p.pareto]
    place_labels(
        ax,
        [(f"{_label(p)}\n{p.latency_ms:.3g} ms, {p.top1:.2%}", p.latency_ms, p.top1 * 100) for p in front + references],
    )
    return fig


def plot_size_vs_accuracy(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """File size vs top-1 for every exported file (eager variants have no file); the files on the size front
    (none smaller without losing accuracy) are joined by a line and named."""
    fig, ax = new_figure()
    shown = [p for p in points if p.size_bytes and p.top1 is not None and p.status == "ok"]
    for runtime, color in _runtime_colors().items():
        group = [p for p in shown if p.runtime == runtime]
        if group:
            ax.scatter(
                [p.size_bytes / _MIB for p in group],
                [p.top1 * 100 for p in group],
                color=color,
                s=46,
                label=runtime,
                edgecolors="black",
                linewidths=0.4,
                zorder=3,
            )
    front = _smallest_for_accuracy(shown)
    _draw_front(ax, [(p.size_bytes / _MIB, p.top1 * 100) for p in front], "Pareto front (size)")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Size vs accuracy (exported files)" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(fontsize=7, loc="best")
    place_labels(
        ax,
        [
            (f"{_label(p)}\n{p.size_bytes / _MIB:.3g} MiB, {p.top1:.2%}", p.size_bytes / _MIB, p.top1 * 100)
            for p in front
        ],
    )
    return fig


def plot_latency_per_backend(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """Median batch-1 latency of every measured variant (bar) with its p90 (whisker), fastest at the top."""
    shown = sorted((p for p in points if p.latency is not None), key=lambda p: p.latency_ms, reverse=True)
    fig, ax = new_figure(8.0, max(3.0, 0.32 * len(shown) + 1.5))
    y = range(len(shown))
    ax.barh(
        list(y),
        [p.latency_ms for p in shown],
        xerr=[[0] * len(shown), [p.latency.p90_ms - p.latency_ms for p in shown]],
        color=[_runtime_colors().get(p.runtime, "grey") for p in shown],
        edgecolor="black",
        linewidth=0.4,
        error_kw={"elinewidth": 0.8, "capsize": 2},
    )
    ax.set_yticks(list(y), [f"{_label(p)} [{p.backend}]" for p in shown], fontsize=7)
    ax.set_xlabel("latency per image, batch 1 (ms): median, whisker to p90")
    ax.set_title("Latency per runtime and backend" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    runtimes = [r for r in _runtime_colors() if any(p.runtime == r for p in shown)]
    if runtimes:
        ax.legend(handles=[Patch(color=_runtime_colors()[r], label=r) for r in runtimes], fontsize=7, loc="lower right")
    return fig


def plot_operator_profile(profile: Sequence[OpTime], title: str) -> Figure:
    """Horizontal bars: each operator's share of the forward pass (PQV-Mobile's figure 3)."""
    rows = list(reversed(profile))
    fig, ax = new_figure(8.0, max(3.0, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [op.total_ms for op in rows], color="#4c72b0", edgecolor="black", linewidth=0.4)
    ax.set_yticks(range(len(rows)), [op.op[:60] for op in rows], fontsize=7)
    for i, op in enumerate(rows):
        ax.annotate(
            f"{op.share * 100:.1f}%", (op.total_ms, i), fontsize=6.5, xytext=(3, -2), textcoords="offset points"
        )
    ax.set_xlabel("time per forward pass (ms)")
    ax.set_title(f"Where the time goes: {title}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return fig
