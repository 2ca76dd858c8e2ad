"""Measurement engine on a tiny ViT: latency statistics, runners of every kind, peak memory, op profiles."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from pqv_lightning.measure import (
    KINDS,
    LatencyStats,
    interleaved_latency,
    kind_of,
    make_runner,
    measure_artifacts,
    measure_latency,
    operator_profile,
    peak_memory,
    runtime_baseline_memory,
    set_threads,
)

KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 10}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()


@pytest.fixture(scope="module")
def records(model, tmp_path_factory):
    from pqv_lightning.export import export_artifacts
    from pqv_lightning.quantization import quantize

    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32)
    val = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    q = quantize(model, "int8_dynamic:x86", x)
    recs = export_artifacts(
        model,
        tmp_path_factory.mktemp("artifacts"),
        {
            "torchscript": ["fp32", "quantized"],
            "lite": ["fp32", "quantized"],
            "executorch": ["fp32"],
            "onnx": ["fp32"],
            "aoti": ["fp32"],
            "openvino": ["fp32"],
        },
        x,
        val,
        quantized=[q],
    )
    return {r.name: r for r in recs}


def test_latency_stats_are_ordered():
    calls = []
    stats = measure_latency(lambda: calls.append(sum(range(2000))), warmup=3, runs=20)
    assert len(calls) == 23
    assert stats.runs == 20
    assert stats.p90_ms >= stats.median_ms >= stats.min_ms > 0
    assert stats.mean_ms >= stats.min_ms and stats.std_ms >= 0


def test_latency_stats_from_known_samples():
    s = LatencyStats.from_samples([float(v) for v in range(1, 11)])
    assert (s.median_ms, s.p90_ms, s.min_ms, s.mean_ms) == (5.5, 9.0, 1.0, 5.5)
    assert math.isclose(s.std_ms, math.sqrt(8.25))
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.from_samples([])


def test_interleaved_runs_round_robin():
    order: list[str] = []
    interleaved_latency({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, runs=3)
    assert order == ["a", "b"] + ["a", "b"] * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"warmup": -1}, "warmup=-1"), ({"runs": 0}, "runs=0")],
)
def test_bad_counts_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency(lambda: None, **kwargs)


def test_bad_kind_and_threads_rejected(model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="kind='tflite' is invalid; accepted: eager"):
        make_runner(model, "tflite", x)
    with pytest.raises(ValueError, match="threads=0"):
        make_runner(model, "eager", x, threads=0)
    with pytest.raises(FileNotFoundError, match="needs the path"):
        make_runner("/nonexistent.onnx", "onnx", x)
    with pytest.raises(ValueError, match="accepted: torchscript, lite, executorch, onnx, aoti"):
        peak_memory("/nonexistent.pt", "eager", [1, 3, 32, 32])
    with pytest.raises(ValueError, match="suffix"):
        kind_of("model.bin")


def test_set_threads_applies_to_torch_and_executorch():
    applied = set_threads(1)
    assert applied["torch"] == 1 and torch.get_num_threads() == 1
    assert applied.get("executorch", 1) == 1


def test_runners_of_every_kind_match_eager(model, records):
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    artifacts = {
        "eager": model,
        "torchscript": records["torchscript-fp32"].path,
        "lite": records["lite-fp32"].path,
        "onnx": records["onnx-fp32"].path,
        "executorch": records["executorch-fp32"].path,
        "aoti": records["aoti-fp32"].path,
        "openvino": records["openvino-fp32"].path,
    }
    assert set(artifacts) == set(KINDS)
    for kind, artifact in artifacts.items():
        runner = make_runner(artifact, kind, x, threads=1)
        assert runner.threads == 1 and runner.kind == kind
        runner()
        out = runner.predict(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-4), f"{kind}: max diff {(out - ref).abs().max():.3g}"
        stats = measure_latency(runner, warmup=1, runs=5)
        assert stats.p90_ms >= stats.median_ms >= stats.min_ms > 0
    # torch.ao int8 TorchScript needs the engine its weights were packed for
    rec = records["torchscript-int8_dynamic_x86"]
    assert rec.status == "ok", rec.reason
    out = make_runner(rec.path, "torchscript", x, threads=1, engine="x86").predict(x)
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_eager_runner_takes_larger_batch(model):
    x = torch.randn(4, 3, 32, 32)
    runner = make_runner(model, "eager", x, threads=1)
    assert runner.predict(x).shape == (4, 10)


def test_peak_memory_exceeds_runtime_baseline(records):
    rec = records["onnx-fp32"]
    baseline = runtime_baseline_memory("onnx", rec.input_shape, threads=1)
    peak = peak_memory(rec.path, "onnx", rec.input_shape, threads=1)
    assert baseline > 10 * 2**20
    assert peak > baseline


def test_operator_profile_lists_linear_ops(model, records):
    x = torch.randn(1, 3, 32, 32)
    eager = operator_profile(model, "eager", x, top=15, passes=3)
    names = [r.op for r in eager]
    assert len(eager) <= 15
    assert any(n in ("aten::addmm", "aten::linear", "aten::mm") for n in names), names
    assert all(0 <= r.share <= 1 and r.total_ms >= 0 for r in eager)
    assert eager == sorted(eager, key=lambda r: r.total_ms, reverse=True)
    ts = operator_profile(records["torchscript-fp32"].path, "torchscript", x, passes=3)
    assert any("addmm" in r.op or "linear" in r.op for r in ts), [r.op for r in ts]
    ox = operator_profile(records["onnx-fp32"].path, "onnx", x, passes=3)
    assert any(r.op in ("MatMul", "Gemm", "FusedMatMul") for r in ox), [r.op for r in ox]
    assert math.isclose(sum(r.share for r in operator_profile(records["onnx-fp32"].path, "onnx", x, top=999)), 1.0)


def test_operator_profile_executorch(records):
    x = torch.randn(1, 3, 32, 32)
    ops = operator_profile(records["executorch-fp32"].path, "executorch", x, passes=3)
    assert any(r.op.startswith("Fully Connected") for r in ops), [r.op for r in ops]


@pytest.mark.slow
def test_measure_artifacts_adds_latency_and_memory(records):
    chosen = [records["onnx-fp32"], records["executorch-fp32"], records["torchscript-int8_dynamic_x86"]]
    failed = records["onnx-fp32"].__class__(**{**records["onnx-fp32"].__dict__, "status": "failed"})
    rows = measure_artifacts([*chosen, failed], threads=1, warmup=1, runs=3, memory=True, memory_runs=1)
    assert [r["measured"] for r in rows] == [True, True, True, False]
    for row in rows[:3]:
        lat = row["latency"]
        assert lat["p90_ms"] >= lat["median_ms"] >= lat["min_ms"] > 0 and lat["runs"] == 3
        assert row["threads"] == 1 and row["batch"] == 1 and row["throughput_ips"] > 0
        assert row["peak_rss_bytes"] > row["runtime_baseline_rss_bytes"] > 0
    assert "latency" not in rows[3]


def test_cpu_info_reads_model_flags_and_vnni():
    from pqv_lightning.measure import CpuInfo, cpu_info

    info = cpu_info()
    assert info.model and info.cores >= 1
    assert f"VNNI: {'yes' if info.vnni else 'no'}" in info.describe()
    fake = CpuInfo("Test CPU", frozenset({"avx2", "avx512_vnni"}), 4)
    assert fake.vnni and "avx512_vnni=yes" in fake.isa() and "amx_int8=no" in fake.isa()
    assert not CpuInfo("Old CPU", frozenset({"avx2"}), 2).vnni


def test_fresh_process_latency_returns_the_quietest_of_its_rounds(records):
    from pqv_lightning.measure import fresh_process_latency

    path = records["onnx-fp32"].path
    stats = fresh_process_latency(path, "onnx", [1, 3, 32, 32], threads=1, warmup=1, runs=9, rounds=3)
    assert stats.runs == 3 and stats.median_ms > 0
    with pytest.raises(ValueError, match=r"rounds=4 is invalid; accepted: an int in \[1, runs\] = \[1, 3\]"):
        fresh_process_latency(path, "onnx", [1, 3, 32, 32], runs=3, rounds=4)
