"""The trade-off plots, drawn on bare matplotlib Figures and saved atomically; the figure helpers are shared
with the sweep's plots."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pqv_lightning.measure import OpTime
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
_RUNTIME_COLORS = {
    "eager": "#4c72b0",
    "torchscript": "#dd8452",
    "lite": "#937860",
    "onnx": "#55a868",
    "executorch": "#c44e52",
}
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
_NEAR_PT = (2.0, 5.0)
_FAR_SIDE_PT = (10.0, 20.0, 34.0, 52.0, 76.0)
_FAR_ROW_PT = (10.0, 20.0, 34.0)
_STEP_PT = (6.0, 8.0)  # between the rows of a side column, between the columns of a row above or below
_AIR_PT = 1.5  # kept free around markers and between labels; also absorbs the hinting of other resolutions
_ATTEMPTS = 6  # greedy passes; each puts the labels that found no free spot first
_HA = {1: "left", 0: "center", -1: "right"}
_VA = {1: "bottom", 0: "center", -1: "top"}


class _Spot(NamedTuple):
    xytext: tuple[float, float]  # offset of the text from its point, in points
    ha: str  # the text is aligned on its side that faces the point
    va: str
    leader: bool


def _spots(marker_pt: float) -> list[_Spot]:
    """Candidate spots, most preferred first: the near ones (right of the point first, where the eye reads on;
    the diagonals; above and below; the left), then the far ones by distance, the right side a little closer."""
    near = [
        _Spot((dx * reach, dy * reach), _HA[dx], _VA[dy], False)
        for reach in (marker_pt + gap for gap in _NEAR_PT)
        for dx, dy in ((1, 0), (1, 1), (1, -1), (0, 1), (0, -1), (-1, 1), (-1, -1), (-1, 0))
    ]
    row, column = _STEP_PT
    beside = [
        _Spot((side * (marker_pt + gap), k * row), _HA[side], "center", True)
        for gap in _FAR_SIDE_PT
        for side in (1, -1)
        for k in range(-8, 9)
    ]
    above_below = [
        _Spot((k * column, side * (marker_pt + gap)), "center", _VA[side], True)
        for gap in _FAR_ROW_PT
        for side in (1, -1)
        for k in range(-6, 7)
    ]
    far = beside + above_below
    return near + sorted(far, key=lambda s: math.hypot(*s.xytext) * (1 if s.xytext[0] >= 0 else 1.25))


class _LabelPlanner:
    """Finds a spot for every label of one drawn axes, measuring candidate text boxes with the Agg renderer (so
    that what is checked is what is drawn) on one probe annotation."""

    def __init__(self, ax: Any, fontsize: float) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = ax.figure
        canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
        canvas.draw()  # settles the autoscaled limits and where a loc="best" legend goes
        self.ax, self.renderer = ax, canvas.get_renderer()
        self.air = _AIR_PT * fig.dpi / 72
        self.frame = ax.bbox.padded(-self.air)
        self.legend = self._pin_legend()
        sizes = [c.get_sizes().max() for c in ax.collections if len(c.get_sizes())]
        self.spots = _spots(max(sizes, default=36) ** 0.5 / 2)
        self.markers = self._marker_boxes()
        self.lines = [line.get_transform().transform_path(line.get_path()) for line in ax.lines]
        self.probe = ax.annotate("", (0, 0), (0, 0), textcoords="offset points", fontsize=fontsize)

    def _pin_legend(self) -> list[Any]:
        """Pin a ``loc="best"`` legend where it was drawn (it would move to dodge the labels); its box."""
        legend = self.ax.get_legend()
        if legend is None:
            return []
        box = legend.get_window_extent(self.renderer)
        legend.set_loc(tuple(box.transformed(self.ax.transAxes.inverted()).p0))
        return [box]

    def _marker_boxes(self) -> list[Any]:
        from matplotlib.transforms import Bbox

        boxes = []
        for collection in self.ax.collections:
            radius = max(collection.get_sizes(), default=0) ** 0.5 / 2 * self.ax.figure.dpi / 72 + self.air
            for x, y in collection.get_offset_transform().transform(collection.get_offsets()):
                boxes.append(Bbox.from_extents(x - radius, y - radius, x + radius, y + radius))
        return boxes

    def _measure(self, spot: _Spot, anchor: Any) -> tuple[Any, Any]:
        """The probe's text box at ``spot`` and, with a leader, the leader as the line from the text's centre to
        the point (matplotlib draws the part of it outside the text)."""
        from matplotlib.path import Path as Line
        from matplotlib.text import Text

        self.probe.set_position(spot.xytext)
        self.probe.set_horizontalalignment(spot.ha)
        self.probe.set_verticalalignment(spot.va)
        box = Text.get_window_extent(self.probe, self.renderer)
        return box, Line([((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2), tuple(anchor)]) if spot.leader else None

    def plan(self, labelled: Sequence[tuple[str, float, float]], order: Sequence[int]) -> tuple[list[_Spot], list[int]]:
        """Place the labels greedily in ``order``: each at its first spot where its text stays inside the axes and,
        with its leader, clear of the legend and of the labels placed before it; spots that also keep the text off
        every marker and line come first. Returns a spot per label and the labels that found no free spot (left
        at their first spot)."""
        boxes, leaders = list(self.legend), []
        chosen: list[_Spot] = list(self.spots[:1]) * len(labelled)
        failed = []
        for i in order:
            text, x, y = labelled[i]
            self.probe.set_text(text)
            self.probe.xy = (x, y)
            self.probe.get_window_extent(self.renderer)  # sets the offset transform of this point
            anchor = self.ax.transData.transform((x, y))
            best = None
            for rank, spot in enumerate(self.spots):
                box, leader = self._measure(spot, anchor)
                if not _contains(self.frame, box) or _collides(box, leader, boxes, leaders):
                    continue
                clutter = (self._clutter(box, leader), rank)
                if best is None or clutter < best[0]:
                    best = (clutter, spot, box, leader)
                if clutter[0] == (0, 0):
                    break
            if best is None:
                failed.append(i)
                best = (None, self.spots[0], *self._measure(self.spots[0], anchor))
            _, chosen[i], box, leader = best
            boxes.append(box.padded(self.air))
            leaders += [] if leader is None else [leader]
        return chosen, failed

    def _clutter(self, box: Any, leader: Any) -> tuple[int, int]:
        """Markers under the text or crossed by the leader (its own point aside), and lines crossing the text."""
        hits = sum(box.overlaps(m) for m in self.markers)
        if leader is not None:
            hits += sum(leader.intersects_bbox(m, False) for m in self.markers) - 1
        return hits, sum(line.intersects_bbox(box, False) for line in self.lines)


def _collides(box: Any, leader: Any, boxes: Sequence[Any], leaders: Sequence[Any]) -> bool:
    """Whether a label (its text box and optional leader) touches a box or a leader already placed."""
    if any(box.overlaps(b) for b in boxes) or any(line.intersects_bbox(box, False) for line in leaders):
        return True
    if leader is None:
        return False
    return any(leader.intersects_bbox(b, False) for b in boxes) or any(leader.intersects_path(line) for line in leaders)


def _contains(frame: Any, box: Any) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _place_labels(ax: Any, labelled: Sequence[tuple[str, float, float]], fontsize: float = 6.5) -> list[Any]:
    """Annotate each ``(text, x, y)`` of a finished axes, no two labels touching, none leaving the axes or covering
    the legend. ``labelled`` is in priority order; the greedy placement is repeated with the labels that found no
    free spot put first, and a label that fits nowhere is still drawn (at its first spot), never dropped."""
    from matplotlib import patheffects

    if not labelled:
        return []
    planner = _LabelPlanner(ax, fontsize)
    order = list(range(len(labelled)))
    best: tuple[list[_Spot], list[int]] | None = None
    for _ in range(_ATTEMPTS):
        chosen, failed = planner.plan(labelled, order)
        if best is None or len(failed) < len(best[1]):
            best = (chosen, failed)
        if not failed:
            break
        order = failed + [i for i in order if i not in failed]
    planner.probe.remove()
    halo = [patheffects.withStroke(linewidth=2.2, foreground="white")]
    return [
        ax.annotate(
            text,
            (x, y),
            spot.xytext,
            textcoords="offset points",
            ha=spot.ha,
            va=spot.va,
            fontsize=fontsize,
            zorder=5,
            annotation_clip=False,
            path_effects=halo,
            arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6} if spot.leader else None,
        )
        for (text, x, y), spot in zip(labelled, best[0], strict=True)
    ]


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
    for runtime, color in _RUNTIME_COLORS.items():
        for network, marker in _NETWORK_MARKERS.items():
            group = [p for p in shown if p.runtime == runtime and p.network == network]
            if group:
                ax.scatter(
                    [p.latency_ms for p in group], [p.top1 * 100 for p in group], color=color, marker=marker,
                    s=46, label=f"{runtime} ({network})", edgecolors="black", linewidths=0.4, zorder=3,
                )  # fmt: skip
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
    _place_labels(
        ax,
        [(f"{_label(p)}\n{p.latency_ms:.3g} ms, {p.top1:.2%}", p.latency_ms, p.top1 * 100) for p in front + references],
    )
    return fig


def plot_size_vs_accuracy(points: Sequence[TradeoffPoint], subtitle: str = "") -> Figure:
    """File size vs top-1 for every exported file (eager variants have no file); the files on the size front
    (none smaller without losing accuracy) are joined by a line and named."""
    fig, ax = new_figure()
    shown = [p for p in points if p.size_bytes and p.top1 is not None and p.status == "ok"]
    for runtime, color in _RUNTIME_COLORS.items():
        group = [p for p in shown if p.runtime == runtime]
        if group:
            ax.scatter(
                [p.size_bytes / _MIB for p in group], [p.top1 * 100 for p in group], color=color, s=46,
                label=runtime, edgecolors="black", linewidths=0.4, zorder=3,
            )  # fmt: skip
    front = _smallest_for_accuracy(shown)
    _draw_front(ax, [(p.size_bytes / _MIB, p.top1 * 100) for p in front], "Pareto front (size)")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Size vs accuracy (exported files)" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    if shown:
        ax.legend(fontsize=7, loc="best")
    _place_labels(
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
