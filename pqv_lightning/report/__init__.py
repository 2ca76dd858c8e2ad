"""The latency / memory / accuracy trade-off of a model's variants: measured, tabulated and plotted.

Engines only (no Lightning): :class:`pqv_lightning.callbacks.TradeoffReport` runs this at fit end and the
sweep (:mod:`pqv_lightning.sweep`) once per grid point. :mod:`~.tradeoff` measures the variants and finds the
Pareto front, :mod:`~.markdown` and :mod:`~.plots` show them, :mod:`~.writer` writes the files.
"""

# ruff: noqa: F401  (the names below are re-exported: __all__ is assembled from the submodules' own lists)
from pqv_lightning.report import markdown, plots, sensitivity, tradeoff, writer
from pqv_lightning.report.markdown import CONTEXT_KEYS, cpu_description, format_number, markdown_report
from pqv_lightning.report.plots import (
    PLOTS,
    new_figure,
    plain_log_ticks,
    plot_accuracy_vs_latency,
    plot_latency_per_backend,
    plot_operator_profile,
    plot_size_vs_accuracy,
    save_figure,
)
from pqv_lightning.report.sensitivity import plot_sensitivity, sensitivity_markdown, sensitivity_table
from pqv_lightning.report.tradeoff import EagerVariant, TradeoffPoint, measure_tradeoffs, pareto_front
from pqv_lightning.report.writer import REPORT_VERSION, write_report

__all__ = sorted([*markdown.__all__, *plots.__all__, *sensitivity.__all__, *tradeoff.__all__, *writer.__all__])
