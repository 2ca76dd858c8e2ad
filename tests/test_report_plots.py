"""The trade-off plots stay readable: the labels drawn are the ones a reader needs, and no two of their drawn
boxes overlap or leave the axes, measured on the Agg-rendered figure at the saved resolution."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Annotation, Text

from pqv_lightning.measure import LatencyStats
from pqv_lightning.report import TradeoffPoint, pareto_front, plot_accuracy_vs_latency, plot_size_vs_accuracy

#: The quickstart report's variants (DeiT-style ViT pruned by 25%, 270 validation images, 1 thread):
#: name, network, runtime, precision, batch-1 median (ms), top-1, file size (bytes); None where not measured.
QUICKSTART = [
    ("dense fp32 eager", "dense", "eager", "fp32", 4.560, 0.97407, None),
    ("pruned fp32 eager", "pruned", "eager", "fp32", 3.104, 0.98148, None),
    ("fp16 eager", "pruned", "eager", "fp16", 5.567, 0.98148, None),
    ("int8_dynamic_x86 eager", "pruned", "eager", "int8_dynamic", 2.740, 0.97778, None),
    ("int8_static_x86 eager", "pruned", "eager", "int8_static", 2.868, 0.98148, None),
    ("int8_pt2e_xnnpack eager", "pruned", "eager", "int8_pt2e", 10.678, 0.98519, None),
    ("int4_weight_xnnpack eager", "pruned", "eager", "int4_weight", 9.172, 0.97778, None),
    ("torchscript-fp32", "pruned", "torchscript", "fp32", 2.278, 0.98148, 6099509),
    ("lite-fp32", "pruned", "lite", "fp32", 2.186, 0.98148, 6287555),
    ("torchscript-fp16", "pruned", "torchscript", "fp16", 4.741, 0.98148, 3077291),
    ("lite-fp16", "pruned", "lite", "fp16", 4.638, 0.98148, 3269487),
    ("torchscript-int8_dynamic_x86", "pruned", "torchscript", "int8", 1.170, 0.98519, 1622217),
    ("lite-int8_dynamic_x86", "pruned", "lite", "int8", 0.890, 0.98519, 1879919),
    ("torchscript-int8_static_x86", "pruned", "torchscript", "int8", 1.017, 0.97778, 1815254),
    ("lite-int8_static_x86", "pruned", "lite", "int8", 0.990, 0.97778, 1830281),
    ("torchscript-int8_pt2e_xnnpack", "pruned", "torchscript", "int8", None, None, None),
    ("lite-int4_weight_xnnpack", "pruned", "lite", "int4", None, None, None),
    ("executorch-fp32", "pruned", "executorch", "fp32", 1.020, 0.98148, 6106536),
    ("executorch-int8", "pruned", "executorch", "int8", 0.480, 0.97407, 1696168),
    ("executorch-int4", "pruned", "executorch", "int4", 0.442, 0.97778, 917800),
    ("onnx-fp32", "pruned", "onnx", "fp32", 1.324, 0.98148, 6417229),
    ("onnx-int8", "pruned", "onnx", "int8", 0.615, 0.98148, 1648347),
]
SUBTITLE = "VisionTransformer, pruned network, epoch 40 | AMD EPYC (2 logical cores, VNNI: yes) | 1 thread(s)"


def _points(rows) -> list[TradeoffPoint]:
    points = [
        TradeoffPoint(
            name, network, runtime, precision, "cpu", status="ok" if ms is not None else "skipped",
            latency=None if ms is None else LatencyStats(ms, ms * 1.1, ms, 0.0, ms, 50), top1=top1, size_bytes=size,
        )
        for name, network, runtime, precision, ms, top1, size in rows
    ]  # fmt: skip
    for point, on_front in zip(points, pareto_front(points), strict=True):
        point.pareto = on_front
    return points


def _assert_readable(fig, dpi: int = 120) -> list[Annotation]:
    """Render ``fig`` with Agg at ``save_figure``'s resolution; no label's text box may touch another's, cover
    the legend or leave the axes, and no leader line may cross another label's text."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    labels = [a for a in ax.texts if isinstance(a, Annotation)]
    boxes = {label.get_text(): Text.get_window_extent(label, renderer) for label in labels}
    assert len(boxes) == len(labels)
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"
    legend = ax.get_legend().get_window_extent(renderer)
    for text, box in boxes.items():
        assert not box.overlaps(legend), f"label {text!r} covers the legend"
        for frame in (ax.bbox, fig.bbox):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text
    for label in labels:
        if label.arrow_patch is not None:
            line = label.arrow_patch.get_transform().transform_path(label.arrow_patch.get_path())
            crossed = [t for t, box in boxes.items() if t != label.get_text() and line.intersects_bbox(box, False)]
            assert not crossed, f"the leader of {label.get_text()!r} crosses {crossed}"
    return labels


def _labelled(labels: list[Annotation]) -> set[str]:
    return {label.get_text().split("\n")[0] for label in labels}


def test_accuracy_vs_latency_labels_the_front_and_the_references_without_overlaps():
    points = _points(QUICKSTART)
    labels = _assert_readable(plot_accuracy_vs_latency(points, SUBTITLE))
    front = {p.name for p in points if p.pareto}
    assert front == {"executorch-int4", "onnx-int8", "lite-int8_dynamic_x86"}
    assert _labelled(labels) == front | {"dense fp32 eager", "pruned fp32 eager"}
    by_name = {p.name: p for p in points}
    for label in labels:  # each label sits at its own point
        point = by_name[label.get_text().split("\n")[0]]
        assert label.xy == pytest.approx((point.latency_ms, point.top1 * 100))


def test_size_vs_accuracy_labels_the_smallest_file_for_each_accuracy_without_overlaps():
    labels = _assert_readable(plot_size_vs_accuracy(_points(QUICKSTART), SUBTITLE))
    assert _labelled(labels) == {"executorch-int4", "torchscript-int8_dynamic_x86"}


def test_a_crowded_front_still_gets_every_label_clear_of_the_others():
    """Eight Pareto points a few pixels apart at the left edge, where only leader lines can reach free space."""
    rows = [
        (f"executorch-v{i}", "pruned", "executorch", "int8", 0.40 + 0.006 * i, 0.975 + 0.0004 * i, 10**6)
        for i in range(8)
    ] + [(f"lite-c{i}", "pruned", "lite", "fp32", 2.0 + 0.3 * i, 0.975, 6 * 10**6) for i in range(10)]
    float_reference = ("float fp32 eager", "float", *QUICKSTART[1][2:])  # a fit without pruning names it "float"
    labels = _assert_readable(plot_accuracy_vs_latency(_points([*rows, QUICKSTART[0], float_reference])))
    assert _labelled(labels) == {f"executorch-v{i}" for i in range(8)} | {"dense fp32 eager", "float fp32 eager"}
    assert any(label.arrow_patch is not None for label in labels)
