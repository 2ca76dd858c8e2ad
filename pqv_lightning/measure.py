"""Measure exported models: latency distributions, peak memory of a fresh process, per-operator time.

Every runtime runs with a fixed, recorded thread count: torch intra-op threads (eager, TorchScript, lite),
onnxruntime ``intra_op_num_threads`` (per session, inter-op 1, idle workers do not spin), and the ExecuTorch
XNNPACK threadpool (process-global, reset through ``portable_lib._unsafe_reset_threadpool``). Latency is a distribution:
warm-up runs first, then median / p90 / mean / std / min over many timed runs. Several variants are best
timed round-robin (:func:`interleaved_latency`) so that load from other processes hits all alike.

Exported files have a fixed input shape (the one they were exported with): to measure a larger batch,
export at that batch. Eager modules take any batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pqv_lightning._warnings import jit_deprecations_silenced
from pqv_lightning.quantization import quantized_engine

if TYPE_CHECKING:
    from pqv_lightning.export import ArtifactRecord

__all__ = [
    "KINDS",
    "CpuInfo",
    "LatencyStats",
    "OpTime",
    "Runner",
    "cpu_info",
    "interleaved_latency",
    "kind_of",
    "make_runner",
    "measure_artifacts",
    "measure_latency",
    "operator_profile",
    "peak_memory",
    "runtime_baseline_memory",
    "set_threads",
]

KINDS = ("eager", "torchscript", "lite", "onnx", "executorch")
FILE_KINDS = KINDS[1:]
_SUFFIX_KIND = {".pt": "torchscript", ".ptl": "lite", ".onnx": "onnx", ".pte": "executorch"}
_LEGACY_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one call, in milliseconds, over ``runs`` timed calls after warm-up."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if len(samples_ms) == 0:
            raise ValueError("no latency samples")
        values = sorted(float(v) for v in samples_ms)
        # nearest-rank 90th percentile: an observed value, never below the median
        p90 = values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]
        return cls(
            median_ms=statistics.median(values),
            p90_ms=max(p90, statistics.median(values)),
            mean_ms=statistics.fmean(values),
            std_ms=statistics.pstdev(values) if len(values) > 1 else 0.0,
            min_ms=values[0],
            runs=len(values),
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class OpTime:
    """One operator's time in one forward pass (averaged over the profiled passes) and its share of the
    summed operator time."""

    op: str
    total_ms: float
    share: float
    calls: int


def _check_counts(warmup: int, runs: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} is invalid; accepted: an int >= 0")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs={runs!r} is invalid; accepted: an int >= 1")


def _check_threads(threads: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} is invalid; accepted: an int >= 1")


def _check_kind(kind: str, accepted: Sequence[str] = KINDS) -> None:
    if kind not in accepted:
        raise ValueError(f"unknown artifact kind {kind!r}; accepted: {', '.join(accepted)}")


def measure_latency(run: Callable[[], Any], warmup: int = 10, runs: int = 50) -> LatencyStats:
    """Time ``run()`` ``runs`` times after ``warmup`` untimed calls."""
    _check_counts(warmup, runs)
    if not callable(run):
        raise TypeError(f"run must be a callable taking no arguments, got {type(run).__name__}")
    return interleaved_latency({"run": run}, warmup, runs)["run"]


def interleaved_latency(
    runs_by_name: dict[str, Callable[[], Any]], warmup: int = 10, runs: int = 50
) -> dict[str, LatencyStats]:
    """Time several variants round-robin (one call of each per round), so that drift in machine load hits
    every variant alike. Each variant is warmed up before the first round."""
    _check_counts(warmup, runs)
    if not runs_by_name:
        raise ValueError("runs_by_name is empty: nothing to time")
    with torch.inference_mode():
        for fn in runs_by_name.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in runs_by_name}
        for _ in range(runs):
            for name, fn in runs_by_name.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: LatencyStats.from_samples(values) for name, values in samples.items()}


def set_threads(threads: int) -> dict[str, int]:
    """Fix the torch intra-op thread count and the ExecuTorch XNNPACK threadpool to ``threads``.

    Both are process-global. onnxruntime takes its count per session (see :func:`make_runner`).
    Returns the counts the runtimes report back.
    """
    _check_threads(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    applied = {"torch": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        from executorch.extension.pybindings import portable_lib

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        applied["executorch"] = int(portable_lib._threadpool_get_thread_count())
    return applied


def kind_of(path: str | os.PathLike) -> str:
    """Artifact kind from a file suffix (``.pt``, ``.ptl``, ``.onnx``, ``.pte``)."""
    suffix = Path(path).suffix
    if suffix not in _SUFFIX_KIND:
        raise ValueError(f"cannot tell the kind of {str(path)!r} from its suffix; accepted: {', '.join(_SUFFIX_KIND)}")
    return _SUFFIX_KIND[suffix]


class Runner:
    """A loaded model bound to one input: ``runner()`` runs it on that input (what is timed),
    ``runner.predict(x)`` runs it on ``x`` and returns a float tensor.

    The loaded program/session is held for the runner's lifetime (an ExecuTorch method must not outlive
    its program).
    """

    def __init__(
        self,
        kind: str,
        predict: Callable[[Tensor], Tensor],
        example_input: Tensor,
        threads: int,
        call: Callable[[], Any] | None = None,
        keep: Any = None,
    ) -> None:
        self.kind = kind
        self.threads = threads
        self.example_input = example_input
        self._predict = predict
        self._call = call or (lambda: predict(example_input))
        self._keep = keep

    def __call__(self) -> Any:
        return self._call()

    def predict(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.as_tensor(self._predict(x.detach().float().contiguous())).float()


def _ort_session(path: str, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # ORT's idle intra-op workers spin by default; in one process next to torch's OpenMP pool (and on a
    # shared machine) that spinning steals the cores the other runtimes time on (measured: torch eager
    # 6x slower on 2 cores while an idle spinning ORT session exists).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def make_runner(
    artifact: nn.Module | str | os.PathLike,
    kind: str,
    example_input: Tensor,
    threads: int = 1,
    engine: str | None = None,
) -> Runner:
    """Load ``artifact`` (an ``nn.Module`` in eval mode for ``"eager"``, else a file path) in its own runtime.

    ``threads`` is fixed for the runtime (see module docstring); ``engine`` is the
    ``torch.backends.quantized`` engine a torch.ao INT8 TorchScript/lite file was packed for (e.g. ``x86``).
    """
    _check_kind(kind)
    _check_threads(threads)
    if engine is not None and engine not in _LEGACY_ENGINES:
        raise ValueError(f"engine={engine!r} is invalid; accepted: None or one of {', '.join(_LEGACY_ENGINES)}")
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise ValueError(f"example_input must be a float Tensor, got {type(example_input).__name__}")
    if kind == "eager":
        if not isinstance(artifact, nn.Module):
            raise TypeError(f"kind 'eager' needs an nn.Module, got {type(artifact).__name__}")
    elif isinstance(artifact, nn.Module) or not Path(artifact).is_file():
        raise FileNotFoundError(f"kind {kind!r} needs the path of an existing file, got {artifact!r}")
    x = example_input.detach().float().contiguous()
    set_threads(threads)

    if kind in ("eager", "torchscript", "lite"):
        if kind == "eager":
            module = artifact  # pt2e-quantized graphs override eval() (returning None): callers pass eval mode
        elif kind == "torchscript":
            with quantized_engine(engine), jit_deprecations_silenced():
                module = torch.jit.load(str(artifact), map_location="cpu").eval()
        else:
            from torch.jit.mobile import _load_for_lite_interpreter

            with quantized_engine(engine), jit_deprecations_silenced():
                module = _load_for_lite_interpreter(str(artifact), map_location="cpu")

        def predict(t: Tensor) -> Tensor:
            with quantized_engine(engine), torch.inference_mode():
                return module(t)

        if engine is None:

            def call() -> Any:
                with torch.inference_mode():
                    return module(x)

            return Runner(kind, predict, x, threads, call, keep=module)
        return Runner(kind, predict, x, threads, keep=module)

    if kind == "onnx":
        session = _ort_session(str(artifact), threads)
        name = session.get_inputs()[0].name
        feed = {name: x.numpy()}
        return Runner(
            kind,
            lambda t: torch.from_numpy(session.run(None, {name: t.numpy()})[0]),
            x,
            threads,
            lambda: session.run(None, feed),
            keep=session,
        )

    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(artifact).read_bytes())
    method = program.load_method("forward")
    return Runner(
        kind, lambda t: method.execute([t])[0], x, threads, lambda: method.execute([x]), keep=(program, method)
    )


# --------------------------------------------------------------------------- the machine

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """CPU model, flags and logical cores: int8 speed-ups depend on the ISA, so every figure states it."""

    model: str
    flags: frozenset[str]
    cores: int

    @property
    def vnni(self) -> bool:
        """AVX-512 VNNI (int8 dot products in 512-bit registers), what the INT8 speed targets assume."""
        return "avx512_vnni" in self.flags

    def isa(self) -> str:
        return " ".join(f"{f}={'yes' if f in self.flags else 'no'}" for f in ISA_FLAGS)

    def describe(self) -> str:
        return f"{self.model} ({self.cores} logical cores, VNNI: {'yes' if self.vnni else 'no'})"


def cpu_info() -> CpuInfo:
    """CPU model name and flags of the first processor in ``/proc/cpuinfo`` (``platform`` off Linux)."""
    import platform

    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value
                if model and flags:
                    break
    except OSError:
        pass
    return CpuInfo(model or platform.processor() or "unknown", frozenset(flags.split()), os.cpu_count() or 1)


# --------------------------------------------------------------------------- peak memory

# Runs in a fresh interpreter: imports only the runtime of ``kind``; loads and runs the model unless
# ``path`` is empty (the baseline); prints the peak RSS in bytes as JSON. The peak is ``VmHWM`` (high-water
# mark of this process image) rather than ``ru_maxrss``: Linux carries ``ru_maxrss`` across fork + exec, so
# the child would report the parent's peak whenever the parent is the larger process.
_CHILD = r"""
import json, resource, sys
kind, path, shape, threads, runs, engine = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
if kind == "onnx":
    import numpy as np
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if path:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(runs):
            sess.run(None, feed)
elif kind == "executorch":
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime
    torch.set_num_threads(threads)
    portable_lib._unsafe_reset_threadpool(threads)
    runtime = Runtime.get()
    x = torch.randn(shape)
    if path:
        with open(path, "rb") as f:
            program = runtime.load_program(f.read())
        method = program.load_method("forward")
        for _ in range(runs):
            method.execute([x])
else:
    import torch
    torch.set_num_threads(threads)
    if engine:
        torch.backends.quantized.engine = engine
    x = torch.randn(shape)
    if path:
        if kind == "lite":
            from torch.jit.mobile import _load_for_lite_interpreter
            module = _load_for_lite_interpreter(path, map_location="cpu")
        else:
            module = torch.jit.load(path, map_location="cpu").eval()
        with torch.inference_mode():
            for _ in range(runs):
                module(x)
with open("/proc/self/status") as f:
    hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")]
print("PQV_PEAK_RSS " + json.dumps(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def _child_peak(kind: str, path: str, input_shape: Sequence[int], threads: int, runs: int, engine: str | None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-c", _CHILD, kind, path, json.dumps([int(s) for s in input_shape])]
    proc = subprocess.run(
        [*args, str(threads), str(runs), engine or ""], capture_output=True, text=True, env=env, timeout=900
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PQV_PEAK_RSS "):
            return int(json.loads(line.split(" ", 1)[1]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"memory child for {kind} {path or '(baseline)'} failed (rc {proc.returncode}): {tail}")


def _check_memory_args(kind: str, input_shape: Sequence[int], threads: int, runs: int) -> None:
    _check_kind(kind, FILE_KINDS)
    _check_threads(threads)
    _check_counts(0, runs)
    if not input_shape or not all(isinstance(s, int) and s > 0 for s in input_shape):
        raise ValueError(f"input_shape={input_shape!r} is invalid; accepted: a list of positive ints")


def peak_memory(
    artifact_path: str | os.PathLike,
    kind: str,
    input_shape: Sequence[int],
    threads: int = 1,
    runs: int = 3,
    engine: str | None = None,
) -> int:
    """Peak resident set size in bytes (raw ``VmHWM``; ``ru_maxrss`` off Linux) of a fresh Python process
    that imports the runtime of ``kind``, loads ``artifact_path`` and runs it ``runs`` times on a random input.

    The process also holds the interpreter and the runtime's libraries: compare with
    :func:`runtime_baseline_memory` to see the model's own share.
    """
    _check_memory_args(kind, input_shape, threads, runs)
    if not Path(artifact_path).is_file():
        raise FileNotFoundError(f"artifact_path {str(artifact_path)!r} is not a file")
    return _child_peak(kind, str(artifact_path), input_shape, threads, runs, engine)


def runtime_baseline_memory(kind: str, input_shape: Sequence[int], threads: int = 1) -> int:
    """Peak RSS in bytes of the same fresh process as :func:`peak_memory` without loading any model."""
    _check_memory_args(kind, input_shape, threads, 1)
    return _child_peak(kind, "", input_shape, threads, 1, None)


# --------------------------------------------------------------------------- operator profile


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
    with tempfile.TemporaryDirectory(prefix="pqv-ort-prof-") as tmp:
        session = _ort_session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
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


_ET_NON_OPS = {"Method::init", "Program::load_method", "Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}


def _executorch_profile(path: str, x: Tensor, threads: int, passes: int) -> tuple[dict[str, float], dict[str, int]]:
    """ETDump events: XNNPACK reports each delegated operator (``"Fully Connected (NC, F32) GEMM #3"``, grouped
    here by the name before ``#``), portable kernels report ``native_call_<op>``."""
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    set_threads(threads)
    program = Runtime.get().load_program(Path(path).read_bytes(), enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    for _ in range(passes):
        method.execute([x])
    with tempfile.TemporaryDirectory(prefix="pqv-etdump-") as tmp:
        etdump = str(Path(tmp) / "run.etdp")
        program.write_etdump_result_to_file(etdump, None)
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
    _check_kind(kind)
    _check_threads(threads)
    _check_counts(0, passes)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r} is invalid; accepted: an int >= 1")
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


# --------------------------------------------------------------------------- artifacts


def _record_engine(record: ArtifactRecord) -> str | None:
    return record.backend if record.format in ("torchscript", "lite") and record.backend in _LEGACY_ENGINES else None


def measure_artifacts(
    records: Sequence[ArtifactRecord],
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    memory: bool = True,
    memory_runs: int = 3,
) -> list[dict]:
    """Latency (and, with ``memory``, peak RSS of a fresh process) of every ``"ok"`` record.

    Returns one dict per record (its fields plus ``latency`` (``LatencyStats`` as a dict), ``threads``,
    ``batch``, ``throughput_ips``, ``peak_rss_bytes``, ``runtime_baseline_rss_bytes``); records that are not
    ``"ok"`` are returned with ``measured=False``. The ok records are timed round-robin at their export
    input shape, on random inputs.
    """
    _check_threads(threads)
    _check_counts(warmup, runs)
    rows: list[dict] = []
    runners: dict[str, Runner] = {}
    for i, rec in enumerate(records):
        row = asdict(rec)
        row["extra"] = {k: v for k, v in row["extra"].items() if k != "traceback"}
        row["measured"] = rec.status == "ok"
        rows.append(row)
        if rec.status == "ok":
            _check_kind(rec.format, FILE_KINDS)
            x = torch.randn(rec.input_shape)
            runners[str(i)] = make_runner(rec.path, rec.format, x, threads, _record_engine(rec))
    stats = interleaved_latency(runners, warmup, runs) if runners else {}
    baselines: dict[tuple[str, tuple[int, ...]], int] = {}
    for i, (rec, row) in enumerate(zip(records, rows, strict=True)):
        if str(i) not in stats:
            continue
        lat = stats[str(i)]
        batch = int(rec.input_shape[0])
        row.update(latency=lat.as_dict(), threads=threads, batch=batch, throughput_ips=batch * 1e3 / lat.median_ms)
        if memory:
            key = (rec.format, tuple(rec.input_shape))
            if key not in baselines:
                baselines[key] = runtime_baseline_memory(rec.format, rec.input_shape, threads)
            row["peak_rss_bytes"] = peak_memory(
                rec.path, rec.format, rec.input_shape, threads, memory_runs, _record_engine(rec)
            )
            row["runtime_baseline_rss_bytes"] = baselines[key]
    return rows
