"""The trade-off report: Pareto front, measuring variants, files and plots, and the ``TradeoffReport`` callback."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pqv_lightning.callbacks import (
    KnowledgeDistillation,
    MobileExport,
    Quantization,
    StructuredPruning,
    TradeoffReport,
)
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.export import export_artifacts
from pqv_lightning.measure import LatencyStats, OpTime
from pqv_lightning.report import (
    EagerVariant,
    TradeoffPoint,
    measure_tradeoffs,
    pareto_front,
    plot_accuracy_vs_latency,
    plot_latency_per_backend,
    plot_size_vs_accuracy,
    write_report,
)


def _point(name: str, ms: float | None, top1: float | None, **kw) -> TradeoffPoint:
    latency = None if ms is None else LatencyStats(ms, ms * 1.1, ms, 0.0, ms, 5)
    return TradeoffPoint(name, "float", kw.pop("runtime", "onnx"), "fp32", "cpu", latency=latency, top1=top1, **kw)


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [
        _point("slow-best", 10.0, 0.99),
        _point("fast-worse", 2.0, 0.95),
        _point("dominated", 5.0, 0.94),  # slower and less accurate than fast-worse
        _point("tie-a", 3.0, 0.97),
        _point("tie-b", 3.0, 0.97),  # identical points do not dominate each other
        _point("equal-speed-worse", 3.0, 0.96),  # same latency as the ties, less accurate
        _point("unmeasured", None, 1.0),
        _point("no-accuracy", 0.1, None),
    ]
    assert dict(zip([p.name for p in points], pareto_front(points), strict=True)) == {
        "slow-best": True,
        "fast-worse": True,
        "dominated": False,
        "tie-a": True,
        "tie-b": True,
        "equal-speed-worse": False,
        "unmeasured": False,
        "no-accuracy": False,
    }


@pytest.fixture(scope="module")
def measured(trained_tiny_vit, digit_tensors, tmp_path_factory):
    model = copy.deepcopy(trained_tiny_vit).eval()
    x, y = digit_tensors["x_heldout"][:64], digit_tensors["y_heldout"][:64]
    out = tmp_path_factory.mktemp("artifacts")
    records = export_artifacts(
        model, out, ["torchscript", "onnx", "executorch"], x[:1], [(x, y)], executorch_precisions=("fp32",)
    )
    variants = [EagerVariant("float fp32 eager", "float", "fp32", model, top1=0.9, top5=1.0, agreement=1.0)]
    points = measure_tradeoffs(
        variants, records, x[:1], networks={"float": model}, threads=1, warmup=2, runs=5, batch=4, memory=True
    )
    return points, records


def test_measure_tradeoffs_measures_every_verified_file_and_the_eager_model(measured):
    points, records = measured
    by_name = {p.name: p for p in points}
    assert set(by_name) == {"float fp32 eager"} | {r.name for r in records}
    for point in points:
        assert point.params is not None and point.params > 0 and point.macs > 0
        if point.status != "ok":
            assert point.latency is None and not point.pareto
            continue
        assert point.latency.runs == 5 and point.latency.median_ms > 0
        assert point.latency.p90_ms >= point.latency.median_ms
        if point.runtime != "eager":
            assert point.size_bytes > 0 and point.top1 is not None
            # a fresh process holding the model needs more than the same process without it
            assert point.peak_rss_bytes > 0 and point.runtime_rss_bytes > 0
    eager = by_name["float fp32 eager"]
    assert eager.size_bytes is None and eager.batch == 4 and eager.batch_ms_per_image > 0
    pte = next(p for p in points if p.runtime == "executorch" and p.status == "ok")
    assert pte.batch_latency is None and "fixed-shape" in pte.batch_note
    assert any(p.pareto for p in points)


def test_measure_tradeoffs_rejects_a_batch_of_one(trained_tiny_vit, digit_tensors):
    with pytest.raises(ValueError, match=r"batch=1 .*accepted: None or an int >= 2"):
        measure_tradeoffs([], [], digit_tensors["x_heldout"][:1], batch=1)


def test_write_report_writes_markdown_json_and_readable_plots(measured, tmp_path):
    points, _ = measured
    profile = [OpTime("aten::linear", 0.5, 0.6, 12), OpTime("aten::softmax", 0.3, 0.4, 2)]
    files = write_report(points, tmp_path / "report", {"title": "tiny", "threads": 1, "runs": 5}, profile, "x.pte")
    assert set(files) == {
        "markdown",
        "json",
        "accuracy_vs_latency",
        "size_vs_accuracy",
        "latency_per_backend",
        "operator_profile",
    }
    text = files["markdown"].read_text()
    for point in points:
        assert point.name in text
    assert "Where the time goes: x.pte" in text and "`aten::linear`" in text and "60.0%" in text
    doc = json.loads(files["json"].read_text())
    assert len(doc["variants"]) == len(points) and doc["plot_errors"] == {}
    assert doc["operator_profile"]["ops"][0]["op"] == "aten::linear"
    assert "VNNI" in doc["meta"]["cpu"] and doc["meta"]["threads"] == 1
    for name in ("accuracy_vs_latency", "size_vs_accuracy", "latency_per_backend", "operator_profile"):
        image = matplotlib.image.imread(files[name])
        assert image.shape[0] > 200 and image.shape[1] > 400
    assert not list((tmp_path / "report").glob(".*tmp"))  # atomic writes leave no temp files


def test_plots_have_labelled_axes_units_and_a_legend(measured):
    points, _ = measured
    for draw, xlabel in (
        (plot_accuracy_vs_latency, "(ms"),
        (plot_size_vs_accuracy, "(MiB)"),
        (plot_latency_per_backend, "(ms)"),
    ):
        fig = draw(points, "subtitle")
        ax = fig.axes[0]
        assert xlabel in ax.get_xlabel()
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
        if draw is not plot_latency_per_backend:
            assert "top-1 (%)" in ax.get_ylabel()
    front_lines = [
        line for line in plot_accuracy_vs_latency(points).axes[0].lines if line.get_label() == "Pareto front"
    ]
    assert len(front_lines) == 1


def test_a_plot_that_fails_is_named_and_the_tables_are_still_written(measured, tmp_path, monkeypatch):
    import pqv_lightning.report.writer as report_writer

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(report_writer, "plot_size_vs_accuracy", broken)
    files = write_report(measured[0], tmp_path, {"threads": 1})
    assert "size_vs_accuracy" not in files and files["markdown"].exists()
    assert "no ink" in json.loads(files["json"].read_text())["plot_errors"]["size_vs_accuracy"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": 0}, r"threads=0 is invalid; accepted: an int >= 1"),
        ({"runs": 0}, r"runs=0 is invalid"),
        ({"warmup": -1}, r"warmup=-1 is invalid; accepted: an int >= 0"),
        ({"batch": 1}, r"batch=1 is invalid; accepted: None or an int >= 2"),
        ({"profile": ""}, r"profile='' is invalid; accepted: 'fastest', a variant name, or None"),
        ({"val_batches": 0}, r"val_batches=0 is invalid"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TradeoffReport(**kwargs)


@pytest.mark.slow
def test_callback_reports_every_variant_to_files_and_tensorboard(tmp_path, trained_classifier):
    """Prune mid-fit with distillation, quantize, export, report: listed first, it still runs last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = TradeoffReport(runs=5, warmup=2, batch=4, profile="fastest")
    callbacks = [
        report,
        StructuredPruning(ratio=0.25, importance="l2", at_epoch=1),
        KnowledgeDistillation(),
        Quantization(["int8_dynamic:x86"], calibration_batches=1),
        MobileExport(formats=["torchscript", "onnx"], onnx_precisions=["fp32", "int8"]),
    ]
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_train_batches=4,
    )
    module = trained_classifier()
    trainer.fit(module, DigitsDataModule(img_size=16, in_chans=1, batch_size=64, augment=False))
    assert report.error is None
    names = {p.name: p for p in report.points}
    assert {"dense fp32 eager", "pruned fp32 eager", "int8_dynamic_x86 eager"} <= set(names)
    dense, pruned = names["dense fp32 eager"], names["pruned fp32 eager"]
    assert dense.network == "dense" and dense.params > pruned.params and dense.macs > pruned.macs
    assert pruned.top1 == pytest.approx(trainer.callback_metrics["val/top1"].item(), abs=1e-6)
    files = [p for p in report.points if p.path]
    assert files and all(p.network == "pruned" for p in files)
    assert report.files["markdown"].parent == tmp_path / "run" / "version_0" / "report"
    text = report.files["markdown"].read_text()
    assert "Where the time goes:" in text and "Pruning: l2 importance, ratio 0.25" in text

    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "tradeoff/pruned_fp32_eager/latency_ms" in tags["scalars"]
    assert "tradeoff/dense_fp32_eager/top1" in tags["scalars"]
    assert {"tradeoff/accuracy_vs_latency", "tradeoff/latency_per_backend"} <= set(tags["images"])
    assert "tradeoff/report/text_summary" in tags["tensors"]
    assert "tradeoff/fastest_file_ms" in tags["scalars"]  # the hparams' headline metrics


def test_callback_warns_and_keeps_the_fit_when_measuring_fails(tmp_path, trained_classifier, monkeypatch):
    import pqv_lightning.pipeline.report as pipeline  # where the callback's report stage looks measure_tradeoffs up

    def broken(*args, **kwargs):
        raise RuntimeError("timer broke")

    monkeypatch.setattr(pipeline, "measure_tradeoffs", broken)
    report = TradeoffReport(output_dir=tmp_path / "report", memory=False, on_failure="warn")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[report],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_train_batches=1,
        limit_val_batches=1,
    )
    module = trained_classifier()
    with pytest.warns(UserWarning, match="TradeoffReport: no report: RuntimeError: timer broke"):
        trainer.fit(module, DigitsDataModule(img_size=16, in_chans=1, batch_size=64, augment=False))
    assert trainer.state.finished and report.error.startswith("RuntimeError")
    assert torch.isfinite(next(module.parameters())).all()
