"""The benchmarks' process-per-variant timing (``benchmarks/_common.py``): workers load once, serve alternating
rounds, report per-round medians, and a broken variant is named and dropped instead of ending the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import TimingWorker, Variant, busy_cores, interleaved_process_latency

from pqv_lightning.utils.deprecations import jit_deprecations_silenced


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("timing") / "tiny.pt"
    with jit_deprecations_silenced():
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()).save(str(path))
    return str(path)


def test_rounds_are_served_by_one_worker_per_variant(scripted: str) -> None:
    variants = {"a": Variant("torchscript", scripted), "b": Variant("torchscript", scripted)}
    messages: list[str] = []
    stats = interleaved_process_latency(
        variants, [1, 8], threads=1, warmup=1, runs=7, rounds=3, progress=messages.append
    )
    assert set(stats) == {"a", "b"}
    for s in stats.values():
        assert len(s.round_medians_ms) == 3
        assert s.pooled.runs == 9  # ceil(7 / 3) timed calls per round
        assert s.median_ms == min(s.round_medians_ms) <= s.pooled.median_ms
        assert s.cpu_median_ms >= 0
    assert messages[0].startswith("process set 1/1: 2 workers loaded")
    assert messages[-1].startswith("round 3/3 done")


def test_rounds_are_split_over_fresh_processes(scripted: str) -> None:
    messages: list[str] = []
    stats = interleaved_process_latency(
        {"a": Variant("torchscript", scripted)}, [1, 8], threads=1, warmup=0, runs=5, rounds=5, processes=2,
        progress=messages.append,
    )  # fmt: skip
    assert len(stats["a"].round_medians_ms) == 5 and stats["a"].pooled.runs == 5
    assert [m.split(":")[0] for m in messages if m.startswith("process set")] == ["process set 1/2", "process set 2/2"]
    assert [m.split(" done")[0] for m in messages if m.startswith("round")] == ["round 2/5", "round 5/5"]
    with pytest.raises(ValueError, match=r"processes=6 is invalid; accepted: an int in \[1, rounds\] = \[1, 5\]"):
        interleaved_process_latency({"a": Variant("torchscript", scripted)}, [1, 8], 1, 0, 5, 5, processes=6)


def test_worker_times_batches_on_demand(scripted: str) -> None:
    with TimingWorker(Variant("torchscript", scripted), [2, 8], threads=1, warmup=0) as worker:
        wall, cpu = worker.time(4)
        assert len(wall) == len(cpu) == 4 and all(w > 0 for w in wall)
        assert len(worker.time(2)[0]) == 2


def test_broken_variant_is_named_and_dropped(scripted: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pt")
    variants = {"good": Variant("torchscript", scripted), "broken": Variant("torchscript", missing)}
    failures: dict[str, str] = {}
    stats = interleaved_process_latency(variants, [1, 8], threads=1, warmup=0, runs=2, rounds=2, failures=failures)
    assert set(stats) == {"good"}
    assert set(failures) == {"broken"} and "missing.pt" in failures["broken"]
    with pytest.raises(RuntimeError, match=r"missing\.pt"):
        interleaved_process_latency({"broken": variants["broken"]}, [1, 8], threads=1, warmup=0, runs=1, rounds=1)


@pytest.mark.parametrize(
    ("name", "value"), [("rounds", 0), ("runs", 0), ("threads", 0), ("warmup", -1), ("processes", 0)]
)
def test_bad_arguments_are_refused_before_any_process_starts(scripted: str, name: str, value: int) -> None:
    kwargs = {"threads": 1, "warmup": 0, "runs": 1, "rounds": 1, name: value}
    with pytest.raises(ValueError, match=f"{name}={value}"):
        interleaved_process_latency({"a": Variant("torchscript", scripted)}, [1, 8], **kwargs)
    with pytest.raises(ValueError, match="kind='tflite' is invalid; accepted: eager"):
        Variant("tflite", scripted)


def test_busy_cores_reads_other_processes_load() -> None:
    import os

    busy = busy_cores(0.2)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1)  # /proc/stat: Linux, as CI
