"""The quantization sensitivity of every layer (or block), as the report shows it: a ranked table and a bar plot.

The analysis is :class:`pqv_lightning.quantization.SensitivityAnalysis`; this module only presents it, most
sensitive unit first: what keeping it alone in float recovers, and what quantizing it alone costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pqv_lightning.quantization import SensitivityAnalysis
from pqv_lightning.report.markdown import format_number
from pqv_lightning.report.plots import new_figure

__all__ = ["plot_sensitivity", "sensitivity_markdown", "sensitivity_table"]


def _cell(metrics: dict[str, float], key: str, spec: str, scale: float = 1.0) -> str:
    value = metrics.get(key)
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format_number(value, spec, scale)


def sensitivity_table(analysis: SensitivityAnalysis) -> str:
    """A Markdown table of one analysis: one row per unit, most sensitive first (console, TensorBoard, report)."""
    quantized = analysis.quantized
    rows = [
        f"Sensitivity to {analysis.target}{f' ({analysis.model})' if analysis.model else ''} per "
        f"{analysis.granularity} ({analysis.images} images): float top-1 "
        f"{100 * analysis.float_top1:.2f}%, all quantized {100 * quantized['top1']:.2f}% (KL {quantized['kl']:.4g}, "
        f"SQNR {quantized['sqnr_db']:.1f} dB). *Alone in float*: everything else quantized; *quantized alone*: "
        "everything else in float. Ranked by the KL that keeping the unit in float removes.",
        "",
        "| rank | unit | layers | float alone: top-1 % | KL | KL recovered | quantized alone: top-1 % | KL | SQNR dB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, unit in enumerate(analysis.units, 1):
        if unit.error is not None:
            rows.append(f"| {rank} | {unit.unit} | {len(unit.layers)} | failed: {unit.error[:100]} | | | | | |")
            continue
        alone, solo = unit.float_alone, unit.quantized_alone
        recovered = format_number(unit.recovery(quantized["kl"]) if alone else None, ".4g")
        rows.append(
            f"| {rank} | {unit.unit} | {len(unit.layers)} | {_cell(alone, 'top1', '.2f', 100)} "
            f"| {_cell(alone, 'kl', '.4g')} | {recovered} | {_cell(solo, 'top1', '.2f', 100)} "
            f"| {_cell(solo, 'kl', '.4g')} | {_cell(solo, 'sqnr_db', '.1f')} |"
        )
    return "\n".join(rows)


def sensitivity_markdown(analyses: Sequence[SensitivityAnalysis]) -> str:
    """The report's sensitivity section: one table per analysis (empty string for none)."""
    if not analyses:
        return ""
    parts = ["## Quantization sensitivity", ""]
    for analysis in analyses:
        parts += [f"### {analysis.target}, per {analysis.granularity}", "", sensitivity_table(analysis), ""]
    return "\n".join(parts)


def plot_sensitivity(analysis: SensitivityAnalysis, subtitle: str = "") -> Any:
    """Horizontal bars per unit, most sensitive on top: the top-1 drop (points, vs float) when the unit alone is
    quantized and when it alone is left in float, with the fully quantized model's drop as a line."""
    units = [u for u in analysis.units if u.error is None]
    fig, ax = new_figure(8.0, max(3.0, 0.32 * len(units) + 1.6))
    positions = list(range(len(units)))[::-1]
    drop = [100 * (analysis.float_top1 - u.quantized_alone.get("top1", math.nan)) for u in units]
    kept = [100 * (analysis.float_top1 - u.float_alone.get("top1", math.nan)) for u in units]
    height = 0.38
    ax.barh([p + height / 2 for p in positions], drop, height, color="#c44e52", label="quantized alone")
    ax.barh([p - height / 2 for p in positions], kept, height, color="#4c72b0", label="alone in float")
    ax.axvline(
        100 * (analysis.float_top1 - analysis.quantized["top1"]),
        color="#333333",
        linestyle="--",
        lw=1,
        label="all quantized",
    )
    ax.set_yticks(positions, [u.unit for u in units], fontsize=7)
    ax.set_xlabel("top-1 drop vs float (points)")
    ax.set_title(
        f"Quantization sensitivity: {analysis.target} per {analysis.granularity}\n{subtitle}".strip(), fontsize=9
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig
