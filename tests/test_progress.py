"""Progress a user can see: each stage and each step of the fit-end chain, pqv-export and latency searches."""

from __future__ import annotations

import io
import re

import pytest

from pqv_lightning.utils.progress import Progress, format_seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_each_step_is_a_line_and_the_end_gives_the_time_per_stage() -> None:
    stream = io.StringIO()
    progress = Progress("fit end", stream)
    assert not progress.bar
    with progress.stage("export", 2):
        progress.step("onnx-fp32", "verified")
        progress.step("onnx-int8", "failed: x")
    with pytest.raises(RuntimeError), progress.stage("report", 1):
        raise RuntimeError("boom")  # a stage that raises is still timed and closed
    line = progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fit end: export (2 steps) ..."
    assert re.fullmatch(r"fit end: export 1/2 onnx-fp32 verified \[\d+\.\d s\]", lines[1])
    assert re.fullmatch(r"fit end: export 2/2 onnx-int8 failed: x \[\d+\.\d s\]", lines[2])
    assert re.fullmatch(r"fit end: export done: 2 steps in \d+\.\d s", lines[3])
    assert lines[-1] == line and re.fullmatch(
        r"fit end: done in \d+\.\d s \(export \d+\.\d s, report \d+\.\d s\)", line
    )
    assert set(progress.elapsed) == {"export", "report"}


def test_in_a_terminal_a_stage_is_a_bar_and_silent_progress_writes_nothing() -> None:
    terminal = _Terminal()
    progress = Progress("pqv-export", terminal)
    assert progress.bar
    with progress.stage("export", 3):
        for name in ("a", "b", "c"):
            progress.step(name)
    text = terminal.getvalue()
    assert "pqv-export: export" in text and "3/3" in text
    silent = Progress.silent()
    with silent.stage("export", 1):
        silent.step("x")
    assert silent.finish().startswith(": done in") and "export" in silent.elapsed


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (4.25, 65, 3725)] == ["4.2 s", "1 min 05 s", "1 h 02 min"]


def test_the_chain_reports_every_variant_and_file_as_it_goes(trained_tiny_vit, digit_tensors, tmp_path) -> None:
    from pqv_lightning.pipeline import ExportConfig, QuantizationConfig, run_pipeline

    x, y = digit_tensors["x_heldout"][:64], digit_tensors["y_heldout"][:64]
    val = [(x[:32], y[:32]), (x[32:], y[32:])]
    stream = io.StringIO()
    result = run_pipeline(
        trained_tiny_vit,
        val,
        val,
        quantization=QuantizationConfig(targets=["int8_dynamic:x86", "fp16"]),
        export=ExportConfig({"onnx": ["fp32"], "torchscript": ["fp32", "quantized"]}, output_dir=tmp_path),
        progress=Progress("fit end", stream),
    )
    text = stream.getvalue()
    assert "fit end: quantization (2 steps) ..." in text
    assert re.search(r"quantization 1/2 int8_dynamic_x86 top-1 \d+\.\d\d% \(\d+\.\d s\)", text)
    # three TorchScript files (the float model and both variants) and one ONNX file
    assert "fit end: export (4 steps) ..." in text
    for name in ("torchscript-fp32", "torchscript-int8_dynamic_x86", "torchscript-fp16", "onnx-fp32"):
        assert re.search(rf"export \d/4 {name} verified \(agreement \d\.\d{{4}}\)", text), name
    assert re.search(r"fit end: done in .* \(quantization .*, export .*\)$", text.strip())
    assert set(result.elapsed) == {"quantization", "export"}


def test_a_latency_search_shows_each_trial(trained_tiny_vit, digit_tensors) -> None:
    from pqv_lightning.latency_search import LatencyTarget, search_ratio
    from pqv_lightning.pruning import PruningSpec

    stream = io.StringIO()
    search = search_ratio(
        trained_tiny_vit, PruningSpec(ratio=0.0), digit_tensors["x_train"][:1], LatencyTarget(5.0, "onnx-int8"),
        trials={0.0: 9.0}, measure=lambda ratio: 10.0 * (1 - ratio), progress=Progress("StructuredPruning", stream),
    )  # fmt: skip
    lines = [line for line in stream.getvalue().splitlines() if " ratio " in line]
    assert len(lines) == len(search.trials) - 1  # the cached trial is not measured again
    assert re.search(r"ratio \d\.\d+ \d+\.\d{3} ms \(target 5 ms\)", lines[0])
