"""The report's files: ``report.md``, ``report.json`` and the PNG plots, each written atomically; a plot that
cannot be drawn never costs the tables."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.export import environment
from pqv_lightning.measure import OpTime
from pqv_lightning.quantization import SensitivityAnalysis
from pqv_lightning.report.markdown import cpu_description, markdown_report
from pqv_lightning.report.plots import (
    plot_accuracy_vs_latency,
    plot_latency_per_backend,
    plot_operator_profile,
    plot_size_vs_accuracy,
    save_figure,
)
from pqv_lightning.report.sensitivity import plot_sensitivity, sensitivity_markdown
from pqv_lightning.report.tradeoff import TradeoffPoint
from pqv_lightning.utils.io import atomic_write_bytes, write_json

__all__ = ["REPORT_VERSION", "write_report"]

REPORT_VERSION = 1


def write_report(
    points: Sequence[TradeoffPoint],
    out_dir: str | os.PathLike,
    meta: dict[str, Any],
    profile: Sequence[OpTime] | None = None,
    profile_of: str | None = None,
    sensitivity: Sequence[SensitivityAnalysis] = (),
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the PNG plots into ``out_dir``, each atomically.

    Returns the written paths by name (``markdown``, ``json`` and one per plot). A plot that cannot be drawn
    is left out and named in the JSON (``plot_errors``); the tables are always written. Each ``sensitivity``
    analysis adds a ranked table and a plot (``sensitivity_<target>``).
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
    for analysis in sensitivity:
        key = f"sensitivity_{analysis.key}"
        figures[key] = lambda a=analysis: plot_sensitivity(a, subtitle)
    written: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for name, draw in figures.items():
        try:
            written[name] = save_figure(draw(), out / f"{name}.png")
        except Exception as err:  # a plot is a view of the tables below: never lose the tables to it
            errors[name] = f"{type(err).__name__}: {err}"
    plots = {name: path.name for name, path in written.items()}
    text = markdown_report(points, meta, profile, profile_of, plots, [sensitivity_markdown(sensitivity)])
    atomic_write_bytes(out / "report.md", text.encode())
    doc = {
        "report_version": REPORT_VERSION,
        "meta": meta,
        "environment": {
            **environment(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "variants": [p.as_dict() for p in points],
        "operator_profile": {"artifact": profile_of, "ops": [asdict(op) for op in profile or []]},
        "sensitivity": [analysis.as_dict() for analysis in sensitivity],
        "plots": plots,
        "plot_errors": errors,
    }
    write_json(out / "report.json", doc)
    return {"markdown": out / "report.md", "json": out / "report.json", **written}
