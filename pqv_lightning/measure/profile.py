"""Where the time of one forward pass goes, per operator, in each runtime's own profiler."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pqv_lightning.measure.machine import set_threads
from pqv_lightning.measure.runner import kinds, make_runner
from pqv_lightning.utils.checks import check_choice, check_int

__all__ = ["OpTime", "operator_profile"]

_ET_NON_OPS = {"Method::init", "Program::load_method", "Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}


@dataclass(frozen=True)
class OpTime:
    """One operator's time in one forward pass (averaged over the profiled passes) and its share of the
    summed operator time."""

    op: str
    total_ms: float
    share: float
    calls: int


def _summarize(times_ms: dict[str, float], calls: dict[str, int], passes: int, top: int) -> list[OpTime]:
    total = sum(times_ms.values())
    rows = [
        OpTime(op, ms / passes, ms / total if total > 0 else 0.0, max(1, round(calls[op] / passes)))
        for op, ms in times_ms.items()
    ]
    rows.sort(key=lambda r: r.total_ms, reverse=True)
    return rows[:top]


def _torch_profile(run: Callable[[], Any], passes: int) -> tuple[dict[str, float], dict[str, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            run()
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        if "::" in evt.key and evt.self_cpu_time_total > 0:
            times[evt.key] += evt.self_cpu_time_total / 1e3
            calls[evt.key] += evt.count
    return times, calls


def _onnx_profile(path: str, x: Tensor, threads: int, passes: int) -> tuple[dict[str, float], dict[str, int]]:
    from pqv_lightning.export.onnx import ort_session

    with tempfile.TemporaryDirectory(prefix="pqv-ort-prof-") as tmp:
        session = ort_session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(passes + 1):  # the first run (allocations, kernel set-up) is dropped below
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    start = run_ends[0] if len(run_ends) > passes else 0
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", e["name"])
            times[op] += e["dur"] / 1e3
            calls[op] += 1
    return times, calls


def _executorch_profile(path: str, x: Tensor, threads: int, passes: int) -> tuple[dict[str, float], dict[str, int]]:
    """ETDump events: XNNPACK reports each delegated operator (``"Fully Connected (NC, F32) GEMM #3"``, grouped
    here by the name before ``#``), portable kernels report ``native_call_<op>``."""
    from executorch.devtools import Inspector

    from pqv_lightning.export.executorch import load_program

    set_threads(threads)
    loaded = load_program(Path(path).read_bytes(), etdump=True)
    for _ in range(passes):
        loaded([x])
    with tempfile.TemporaryDirectory(prefix="pqv-etdump-") as tmp:
        etdump = str(Path(tmp) / "run.etdp")
        loaded.program.write_etdump_result_to_file(etdump, None)
        with warnings.catch_warnings():  # we read timings only: no debug buffer is wanted, none was written
            warnings.filterwarnings("ignore", message="Output Buffer not found", category=UserWarning)
            inspector = Inspector(etdump_path=etdump)
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.name in _ET_NON_OPS or event.perf_data is None:
                continue
            op = re.sub(r"\s+#\d+$", "", event.name)
            times[op] += float(sum(event.perf_data.raw))
            calls[op] += len(event.perf_data.raw)
    return times, calls


def operator_profile(
    artifact: nn.Module | str | os.PathLike,
    kind: str,
    example_input: Tensor,
    top: int = 15,
    threads: int = 1,
    passes: int = 5,
    engine: str | None = None,
) -> list[OpTime]:
    """The ``top`` operators by time in one forward pass, with their share of the summed operator time.

    eager / TorchScript / lite: ``torch.profiler`` self CPU time per ``aten::``-style op; ONNX: onnxruntime's
    profiling JSON (node kernel time by op type); ExecuTorch: ETDump (per XNNPACK operator type and per
    portable kernel). Unlike a latency figure this is one small sample (``passes`` passes after one warm-up).
    """
    check_choice("kind", kind, kinds())
    check_int("threads", threads, 1)
    check_int("passes", passes, 1)
    check_int("top", top, 1)
    x = example_input.detach().float().contiguous()
    if kind == "onnx":
        times, calls = _onnx_profile(str(artifact), x, threads, passes)
    elif kind == "executorch":
        times, calls = _executorch_profile(str(artifact), x, threads, passes)
    else:
        runner = make_runner(artifact, kind, x, threads, engine)
        with torch.inference_mode():
            runner()
            times, calls = _torch_profile(runner, passes)
    if not times:
        raise RuntimeError(f"the {kind} profiler recorded no operator events")
    return _summarize(times, calls, passes, top)
