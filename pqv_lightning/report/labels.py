"""Labels that never overlap: a greedy placement of point labels over candidate offsets, measured with the
renderer's own text extents (no dependency beyond matplotlib).

Candidate spots are tried in order, close to the point first (right side preferred), then further out with a thin
leader line, in side columns and in rows above or below, so that labels of crowded points can stack. A label must
stay inside the axes and touch neither the legend, nor another label, nor another label's leader line; spots that
also keep clear of markers and of drawn lines are preferred. A label that finds no free spot is tried first in the
next pass (up to ``_ATTEMPTS`` passes); one that fits nowhere is drawn anyway, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = ["place_labels"]

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


def place_labels(ax: Any, labelled: Sequence[tuple[str, float, float]], fontsize: float = 6.5) -> list[Any]:
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
