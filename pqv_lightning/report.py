"""The latency / memory / accuracy trade-off of a model's variants: measured, tabulated and plotted.

A *variant* is one way to ship the model: the eager float network (and the dense one it was pruned from),
each quantized eager module, and every exported file, each run in its own runtime. For each the report holds
validation accuracy (computed through that runtime), latency (batch 1 and, where the runtime accepts it, a
larger batch), file size, peak memory of a fresh process, parameters and MACs. Variants on the Pareto front of
latency vs top-1 (nothing else is both faster and at least as accurate) are marked: those are the choices.

Engines only (no Lightning): :class:`pqv_lightning.callbacks.TradeoffReport` runs this at fit end and the
sweep (:mod:`pqv_lightning.sweep`) once per grid point.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pqv_lightning._io import atomic_write, atomic_write_bytes, write_json
from pqv_lightning.export import _environment
from pqv_lightning.measure import (
    FILE_KINDS,
    LatencyStats,
    OpTime,
    _record_engine,
    cpu_info,
    interleaved_latency,
    make_runner,
    peak_memory,
    runtime_baseline_memory,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pqv_lightning.export import ArtifactRecord

__all__ = [
    "PLOTS",
    "EagerVariant",
    "TradeoffPoint",
    "cpu_description",
    "markdown_report",
    "measure_tradeoffs",
    "pareto_front",
    "plot_accuracy_vs_latency",
    "plot_latency_per_backend",
    "plot_operator_profile",
    "plot_size_vs_accuracy",
    "save_figure",
    "write_report",
]

REPORT_VERSION = 1
PLOTS = ("accuracy_vs_latency", "size_vs_accuracy", "latency_per_backend", "operator_profile")
_RUNTIME_COLORS = {
    "eager": "#4c72b0",
    "torchscript": "#dd8452",
    "lite": "#937860",
    "onnx": "#55a868",
    "executorch": "#c44e52",
}
_NETWORK_MARKERS = {"dense": "s", "pruned": "o", "float": "o"}
_MIB = 2**20


@dataclass
class EagerVariant:
    """An in-process PyTorch module to measure next to the exported files.

    ``top1``/``top5``/``agreement`` are fractions (as logged in ``val/top1``), measured by the caller.
    """

    name: str
    network: str
    precision: str
    module: nn.Module
    backend: str = "-"
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None


@dataclass
class TradeoffPoint:
    """One measured variant (one report row). Accuracies are fractions; latencies are per call."""

    name: str
    network: str
    runtime: str
    precision: str
    backend: str
    status: str = "ok"
    reason: str | None = None
    path: str | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    latency: LatencyStats | None = None
    batch: int | None = None
    batch_latency: LatencyStats | None = None
    batch_note: str | None = None
    peak_rss_bytes: int | None = None
    runtime_rss_bytes: int | None = None
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        """Median latency of one batch-1 call."""
        return None if self.latency is None else self.latency.median_ms

    @property
    def batch_ms_per_image(self) -> float | None:
        if self.batch_latency is None or not self.batch:
            return None
        return self.batch_latency.median_ms / self.batch

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["latency_ms"] = self.latency_ms
        row["batch_ms_per_image"] = self.batch_ms_per_image
        return row


def pareto_front(points: Sequence[TradeoffPoint]) -> list[bool]:
    """Which points no other point dominates (at most as slow and at least as accurate, strictly better in one).

    Points without a latency or a top-1 (failed, skipped, unmeasured) are never on the front.
    """
    measured = [
        (i, p.latency_ms, p.top1) for i, p in enumerate(points) if p.latency_ms is not None and p.top1 is not None
    ]
    front = [False] * len(points)
    for i, lat, acc in measured:
        front[i] = not any(
            (lat2 <= lat and acc2 >= acc) and (lat2 < lat or acc2 > acc) for j, lat2, acc2 in measured if j != i
        )
    return front


# --------------------------------------------------------------------------- measuring


def _count(model: nn.Module, example_input: Tensor) -> tuple[int | None, int | None]:
    from pqv_lightning.pruning import count_macs_params

    try:
        macs, params = count_macs_params(model, example_input[:1])
    except Exception:  # an exotic module torch-pruning cannot trace: parameters still count
        return None, sum(p.numel() for p in model.parameters())
    return macs, params


def _batched(x: Tensor, batch: int) -> Tensor:
    return x[:1].expand(batch, *x.shape[1:]).contiguous()


def measure_tradeoffs(
    eager: Sequence[EagerVariant],
    records: Sequence[ArtifactRecord],
    example_input: Tensor,
    *,
    networks: dict[str, nn.Module] | None = None,
    files_network: str = "float",
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    batch: int | None = 16,
    memory: bool = True,
) -> list[TradeoffPoint]:
    """Measure every eager variant and every ``"ok"`` exported file, all with ``threads`` threads.

    Latency: batch 1, timed round-robin over all variants (:func:`pqv_lightning.measure.interleaved_latency`);
    then, separately, at ``batch`` for every variant whose runtime accepts that shape (exported files are
    fixed to their export shape unless the runtime resizes; ExecuTorch programs never do). Memory: the peak RSS
    of a fresh process loading and running each file (eager variants live in this process: none).
    ``networks`` maps a network name (``"dense"``, ``"pruned"``) to its float module, for parameters and
    MACs; exported files belong to ``files_network``. Failed or skipped records become rows with their reason.
    """
    if isinstance(batch, bool) or (batch is not None and (not isinstance(batch, int) or batch < 2)):
        raise ValueError(f"batch={batch!r} is invalid; accepted: None or an int >= 2 (batch 1 is always measured)")
    x = example_input[:1].detach().float().contiguous()
    counts = {name: _count(module, x) for name, module in (networks or {}).items()}
    points: list[TradeoffPoint] = []
    runners: dict[int, Any] = {}
    eager_modules: dict[int, nn.Module] = {}
    for v in eager:
        macs, params = counts.get(v.network, (None, None))
        point = TradeoffPoint(
            v.name, v.network, "eager", v.precision, v.backend, params=params, macs=macs,
            top1=v.top1, top5=v.top5, agreement=v.agreement,
        )  # fmt: skip
        runners[len(points)] = make_runner(v.module, "eager", x, threads)
        eager_modules[len(points)] = v.module
        points.append(point)
    files: dict[int, ArtifactRecord] = {}
    for rec in records:
        macs, params = counts.get(files_network, (None, None))
        point = TradeoffPoint(
            rec.name, files_network, rec.format, rec.precision, rec.backend, status=rec.status, reason=rec.reason,
            path=rec.path, params=params, macs=macs, size_bytes=rec.size_bytes, top1=rec.val_top1,
            top5=rec.val_top5, agreement=rec.top1_agreement,
        )  # fmt: skip
        if rec.status == "ok" and rec.format in FILE_KINDS and rec.path:
            if list(rec.input_shape[1:]) != list(x.shape[1:]) or rec.input_shape[0] != 1:
                point.reason = f"exported for input {rec.input_shape}, not measured at batch 1"
            else:
                runners[len(points)] = make_runner(rec.path, rec.format, x, threads, _record_engine(rec))
                files[len(points)] = rec
        points.append(point)

    stats = interleaved_latency(runners, warmup, runs) if runners else {}
    for i, lat in stats.items():
        points[i].latency = lat

    if batch is not None:
        xb = _batched(x, batch)
        batch_runners: dict[int, Any] = {}
        for i in runners:
            point = points[i]
            if point.runtime == "executorch":
                point.batch_note = "fixed-shape program (exported at batch 1)"
                continue
            source = eager_modules[i] if i in eager_modules else files[i].path
            try:
                runner = make_runner(
                    source, point.runtime, xb, threads, _record_engine(files[i]) if i in files else None
                )
                out = runner.predict(xb)
                if out.shape[0] != batch:
                    raise RuntimeError(f"returned batch {out.shape[0]}")
            except Exception as err:  # fixed-shape graphs refuse other batch sizes: a fact, not a failure
                point.batch_note = f"does not run at batch {batch}: {str(err).strip().splitlines()[0][:120]}"
                continue
            batch_runners[i] = runner
        batch_stats = (
            interleaved_latency(batch_runners, max(1, warmup // 2), max(5, runs // 5)) if batch_runners else {}
        )
        for i, lat in batch_stats.items():
            points[i].batch, points[i].batch_latency = batch, lat
    del runners

    if memory:
        baselines: dict[str, int] = {}
        for i, rec in files.items():
            try:
                if rec.format not in baselines:
                    baselines[rec.format] = runtime_baseline_memory(rec.format, rec.input_shape, threads)
                points[i].runtime_rss_bytes = baselines[rec.format]
                points[i].peak_rss_bytes = peak_memory(
                    rec.path, rec.format, rec.input_shape, threads, 3, _record_engine(rec)
                )
            except Exception as err:
                points[i].extra["memory_error"] = f"{type(err).__name__}: {err}"[:300]
    for point, on_front in zip(points, pareto_front(points), strict=True):
        point.pareto = on_front
    return points


# --------------------------------------------------------------------------- text


def cpu_description() -> str:
    """CPU model, logical cores and whether it has AVX-512 VNNI (int8 speed-ups depend on it)."""
    return cpu_info().describe()


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value * scale, spec)


def markdown_report(
    points: Sequence[TradeoffPoint],
    meta: dict[str, Any],
    profile: Sequence[OpTime] | None = None,
    profile_of: str | None = None,
    plots: dict[str, str] | None = None,
) -> str:
    """The report as Markdown: context, one table row per variant (Pareto choices in bold), the operator
    profile and the plots."""
    threads = meta.get("threads")
    lines = [
        f"# Trade-off report: {meta.get('title', 'model variants')}",
        "",
        f"- Measured {meta.get('date', '')} on {meta.get('cpu', cpu_description())}, {threads} thread(s) per "
        f"runtime, batch 1 unless stated; latency = median (p90) of {meta.get('runs')} timed calls after "
        f"{meta.get('warmup')} warm-up calls, all variants timed round-robin in one process.",
        f"- Accuracy: validation top-1 / top-5 on {meta.get('val_images', '?')} images, computed through each "
        "variant's own runtime; agreement = share of images where it predicts the float model's class.",
        "- Peak RSS: high-water mark of a fresh process that loads the file and runs it 3 times; in brackets, "
        "the same process without the model (the runtime's own share). Eager variants run in this process.",
        "- **Bold** rows are on the Pareto front of latency vs top-1: nothing else is both faster and at least "
        "as accurate.",
    ]
    for key in ("pruning", "distillation", "note"):
        if meta.get(key):
            lines.append(f"- {key.capitalize()}: {meta[key]}")
    batch = next((p.batch for p in points if p.batch), None)
    lines += [
        "",
        f"| variant | network | runtime | precision | backend | top-1 % | top-5 % | agreement | ms (b1) | p90 ms "
        f"| ms/image (b{batch or '-'}) | size MiB | peak RSS MiB | params M | MMACs | status |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        name = f"**{p.name}**" if p.pareto else p.name
        rss = ""
        if p.peak_rss_bytes is not None:
            rss = f"{p.peak_rss_bytes / _MIB:.0f}"
            if p.runtime_rss_bytes is not None:
                rss += f" ({p.runtime_rss_bytes / _MIB:.0f})"
        status = p.status if p.status == "ok" else f"{p.status}: {(p.reason or '')[:80]}"
        status = status.replace("|", "/")
        lines.append(
            f"| {name} | {p.network} | {p.runtime} | {p.precision} | {p.backend} | {_fmt(p.top1, '.2f', 100)} "
            f"| {_fmt(p.top5, '.2f', 100)} | {_fmt(p.agreement, '.4f')} | {_fmt(p.latency_ms, '.3f')} "
            f"| {_fmt(p.latency.p90_ms if p.latency else None, '.3f')} | {_fmt(p.batch_ms_per_image, '.3f')} "
            f"| {_fmt(p.size_bytes, '.2f', 1 / _MIB)} | {rss} | {_fmt(p.params, '.3f', 1e-6)} "
            f"| {_fmt(p.macs, '.1f', 1e-6)} | {status} |"
        )
    notes = sorted({p.batch_note for p in points if p.batch_note})
    if notes:
        lines += ["", f"Not measured at batch {batch or 'N'}: " + "; ".join(notes) + "."]
    if profile:
        lines += [
            "",
            f"## Where the time goes: {profile_of}",
            "",
            "| operator | ms per forward | share | calls |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| `{op.op}` | {op.total_ms:.3f} | {op.share * 100:.1f}% | {op.calls} |" for op in profile]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG atomically (no half-written image is ever visible)."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return path


def _figure(width: float = 8.0, height: float = 5.5, ncols: int = 1) -> tuple[Figure, Any]:
    """A bare Figure (no pyplot: no GUI backend, no global figure registry to leak into) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot() if ncols == 1 else fig.subplots(1, ncols)


def _label(p: TradeoffPoint) -> str:
    return p.name.removeprefix("model_")


def _annotate(ax: Any, labelled: Sequence[tuple[str, float, float]]) -> None:
    """Small labels beside the points; points sharing a y value get staggered offsets so labels do not stack."""
    seen: dict[float, int] = {}
    for text, x, y in sorted(labelled, key=lambda t: (t[2], t[1])):
        k = seen.get(round(y, 6), 0)
        seen[round(y, 6)] = k + 1
        ax.annotate(text, (x, y), fontsize=6.5, xytext=(4, 3 - 9 * (k % 3)), textcoords="offset points")


def _plain_ticks(axis: Any) -> None:
    """Log-scale ticks as plain numbers (0.2, 0.5, 1, 2), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def plot_accuracy_vs_latency(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """Top-1 vs batch-1 latency, colour = runtime, marker = network, the Pareto front as a line."""
    fig, ax = _figure()
    shown = [p for p in points if p.latency_ms is not None and p.top1 is not None]
    for runtime, color in _RUNTIME_COLORS.items():
        for network, marker in _NETWORK_MARKERS.items():
            group = [p for p in shown if p.runtime == runtime and p.network == network]
            if group:
                ax.scatter(
                    [p.latency_ms for p in group], [p.top1 * 100 for p in group], color=color, marker=marker,
                    s=46, label=f"{runtime} ({network})", edgecolors="black", linewidths=0.4, zorder=3,
                )  # fmt: skip
    front = sorted((p for p in shown if p.pareto), key=lambda p: p.latency_ms)
    if front:
        ax.step(
            [p.latency_ms for p in front], [p.top1 * 100 for p in front], where="post", color="black",
            linestyle="--", linewidth=1, label="Pareto front", zorder=2,
        )  # fmt: skip
    _annotate(ax, [(_label(p), p.latency_ms, p.top1 * 100) for p in shown])
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("latency per image, batch 1 (ms, median, log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Accuracy vs latency" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_size_vs_accuracy(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """File size vs top-1 for every exported file (eager variants have no file)."""
    fig, ax = _figure()
    shown = [p for p in points if p.size_bytes and p.top1 is not None and p.status == "ok"]
    for runtime, color in _RUNTIME_COLORS.items():
        group = [p for p in shown if p.runtime == runtime]
        if group:
            ax.scatter(
                [p.size_bytes / _MIB for p in group], [p.top1 * 100 for p in group], color=color, s=46,
                label=runtime, edgecolors="black", linewidths=0.4, zorder=3,
            )  # fmt: skip
    _annotate(ax, [(_label(p), p.size_bytes / _MIB, p.top1 * 100) for p in shown])
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Size vs accuracy (exported files)" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(fontsize=7, loc="best")
    return fig


def plot_latency_per_backend(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """Median batch-1 latency of every measured variant (bar) with its p90 (whisker), fastest at the top."""
    shown = sorted((p for p in points if p.latency is not None), key=lambda p: p.latency_ms, reverse=True)
    fig, ax = _figure(8.0, max(3.0, 0.32 * len(shown) + 1.5))
    y = range(len(shown))
    ax.barh(
        list(y), [p.latency_ms for p in shown],
        xerr=[[0] * len(shown), [p.latency.p90_ms - p.latency_ms for p in shown]],
        color=[_RUNTIME_COLORS.get(p.runtime, "grey") for p in shown], edgecolor="black", linewidth=0.4,
        error_kw={"elinewidth": 0.8, "capsize": 2},
    )  # fmt: skip
    ax.set_yticks(list(y), [f"{_label(p)} [{p.backend}]" for p in shown], fontsize=7)
    ax.set_xlabel("latency per image, batch 1 (ms): median, whisker to p90")
    ax.set_title("Latency per runtime and backend" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    runtimes = [r for r in _RUNTIME_COLORS if any(p.runtime == r for p in shown)]
    if runtimes:
        ax.legend(handles=[Patch(color=_RUNTIME_COLORS[r], label=r) for r in runtimes], fontsize=7, loc="lower right")
    return fig


def plot_operator_profile(profile: Sequence[OpTime], title: str) -> Figure:
    """Horizontal bars: each operator's share of the forward pass (PQV-Mobile's figure 3)."""
    rows = list(reversed(profile))
    fig, ax = _figure(8.0, max(3.0, 0.3 * len(rows) + 1.5))
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


# --------------------------------------------------------------------------- files


def write_report(
    points: Sequence[TradeoffPoint],
    out_dir: str | os.PathLike,
    meta: dict[str, Any],
    profile: Sequence[OpTime] | None = None,
    profile_of: str | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the PNG plots into ``out_dir``, each atomically.

    Returns the written paths by name (``markdown``, ``json`` and one per plot). A plot that cannot be drawn
    is left out and named in the JSON (``plot_errors``); the tables are always written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_description(),
        **meta,
    }
    subtitle = f"{meta.get('title', '')} | {meta['cpu']} | {meta.get('threads')} thread(s)".strip(" |")
    figures = {
        "accuracy_vs_latency": lambda: plot_accuracy_vs_latency(points, subtitle),
        "size_vs_accuracy": lambda: plot_size_vs_accuracy(points, subtitle),
        "latency_per_backend": lambda: plot_latency_per_backend(points, subtitle),
    }
    if profile:
        figures["operator_profile"] = lambda: plot_operator_profile(profile, profile_of or "")
    written: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for name, draw in figures.items():
        try:
            written[name] = save_figure(draw(), out / f"{name}.png")
        except Exception as err:  # a plot is a view of the tables below: never lose the tables to it
            errors[name] = f"{type(err).__name__}: {err}"
    plots = {name: path.name for name, path in written.items()}
    text = markdown_report(points, meta, profile, profile_of, plots)
    atomic_write_bytes(out / "report.md", text.encode())
    doc = {
        "report_version": REPORT_VERSION,
        "meta": meta,
        "environment": {
            **_environment(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "variants": [p.as_dict() for p in points],
        "operator_profile": {"artifact": profile_of, "ops": [asdict(op) for op in profile or []]},
        "plots": plots,
        "plot_errors": errors,
    }
    write_json(out / "report.json", doc)
    return {"markdown": out / "report.md", "json": out / "report.json", **written}
