"""The trade-off report as Markdown: context, one row per variant, the operator profile and the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pqv_lightning.measure import OpTime, cpu_info
from pqv_lightning.report.tradeoff import TradeoffPoint

__all__ = ["CONTEXT_KEYS", "cpu_description", "format_number", "markdown_report"]

_MIB = 2**20


#: The notes about a run the report lists (from the fit: ``report_context``), in this order.
CONTEXT_KEYS = (
    "pruning",
    "tokens",
    "distillation",
    "quantization_aware_training",
    "weights",
    "smoothing",
    "quantization_recipe",
    "note",
)


def cpu_description() -> str:
    """CPU model, logical cores and whether it has AVX-512 VNNI (int8 speed-ups depend on it)."""
    return cpu_info().describe()


def format_number(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` in ``format`` ``spec`` for a table cell; ``""`` for a missing or NaN value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value * scale, spec)


def markdown_report(
    points: Sequence[TradeoffPoint],
    meta: dict[str, Any],
    profile: Sequence[OpTime] | None = None,
    profile_of: str | None = None,
    plots: dict[str, str] | None = None,
    sections: Sequence[str] = (),
) -> str:
    """The report as Markdown: context, one table row per variant (Pareto choices in bold), the operator
    profile, further ``sections`` (Markdown, e.g. the quantization sensitivity) and the plots."""
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
    for key in (*CONTEXT_KEYS, "attention"):
        if meta.get(key):
            lines.append(f"- {key.replace('_', ' ').capitalize()}: {meta[key]}")
    batch = next((p.batch for p in points if p.batch), None)
    lines += [
        "",
        f"| variant | network | runtime | precision | backend | top-1 % | top-5 % | agreement | ms (b1) | p90 ms "
        f"| ms/image (b{batch or '-'}) | size MiB | peak RSS MiB | params M | MMACs | status |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    num = format_number
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
            f"| {name} | {p.network} | {p.runtime} | {p.precision} | {p.backend} | {num(p.top1, '.2f', 100)} "
            f"| {num(p.top5, '.2f', 100)} | {num(p.agreement, '.4f')} | {num(p.latency_ms, '.3f')} "
            f"| {num(p.latency.p90_ms if p.latency else None, '.3f')} | {num(p.batch_ms_per_image, '.3f')} "
            f"| {num(p.size_bytes, '.2f', 1 / _MIB)} | {rss} | {num(p.params, '.3f', 1e-6)} "
            f"| {num(p.macs, '.1f', 1e-6)} | {status} |"
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
    for section in sections:
        if section:
            lines += ["", section.rstrip()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"
