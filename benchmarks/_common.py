"""Helpers shared by the benchmark scripts: CPU model and ISA flags, fixed thread counts, the header line, and
timing of each variant in its own fresh process.

In-process timing is the library's (:func:`pqv_lightning.measure.interleaved_latency`, round-robin so that load
from other processes hits every variant alike). :func:`interleaved_process_latency` times every variant in a fresh
Python process instead (several alternating rounds), so that no runtime's thread pool, allocator or import side
effects can slow another one down.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from pqv_lightning.measure import CpuInfo, LatencyStats, cpu_info, interleaved_latency, set_threads

__all__ = [
    "CpuInfo",
    "LatencyStats",
    "ProcessLatency",
    "Variant",
    "cpu_family",
    "cpu_info",
    "fix_threads",
    "header",
    "interleaved_latency",
    "interleaved_process_latency",
    "load_average",
    "ratio",
    "time_in_fresh_process",
]


def cpu_family() -> str:
    """``cpu family`` from ``/proc/cpuinfo`` (e.g. 25 = AMD Zen 3/4, 26 = Zen 5), "" if unknown."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "cpu family":
                return value.strip()
    return ""


def fix_threads(threads: int) -> dict[str, int]:
    """Fix torch intra-op (and, if still possible, inter-op) threads and the ExecuTorch XNNPACK threadpool
    to ``threads``; onnxruntime sessions get theirs from :func:`pqv_lightning.measure.make_runner`.
    ``OMP_NUM_THREADS`` is exported for child processes."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(threads)
    return set_threads(threads)


def load_average() -> str:
    """The 1/5/15-minute load averages, as printed by every benchmark."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def header(threads: int) -> str:
    """Lines stating CPU, ISA, load, thread counts and library versions, for every benchmark's output."""
    from importlib import metadata

    cpu = cpu_info()
    applied = fix_threads(threads)
    versions = []
    for pkg in ("torch", "executorch", "onnxruntime", "timm"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return "\n".join(
        [
            f"CPU: {cpu.model} (cpu family {cpu_family() or '?'}, {cpu.cores} logical cores) | "
            f"avx512_vnni: {'yes' if cpu.vnni else 'NO'}",
            f"ISA: {cpu.isa()} avx512_bf16={'yes' if 'avx512_bf16' in cpu.flags else 'no'}",
            f"load average (1/5/15 min) at start: {load_average()}",
            f"threads: torch {applied['torch']}, ExecuTorch XNNPACK threadpool {applied.get('executorch', 'n/a')},"
            f" onnxruntime intra-op {threads} (inter-op 1)",
            ", ".join(versions),
        ]
    )


def ratio(reference: LatencyStats | None, candidate: LatencyStats | None) -> float | None:
    """Speed-up of ``candidate`` over ``reference`` (ratio of medians), None if either is missing."""
    if reference is None or candidate is None:
        return None
    return reference.median_ms / candidate.median_ms


# --------------------------------------------------------------------------- fresh-process timing

CHILD_KINDS = ("eager", "torchscript", "lite", "onnx", "executorch")


@dataclass(frozen=True)
class Variant:
    """How a fresh process loads one variant to time.

    ``path``: the artifact (``.pt``/``.ptl``/``.onnx``/``.pte``), or for ``"eager"`` a ``state_dict`` file
    (read with ``weights_only=True``) of the timm model ``model`` built with ``model_kwargs``; ``structure``:
    a JSON pruning structure replayed with :func:`pqv_lightning.pruning.apply_structure` before loading it.
    ``engine``: the ``torch.backends.quantized`` engine a torch.ao INT8 TorchScript/lite file needs.
    ``ort_spinning``: onnxruntime's default (idle intra-op workers spin) when True, spinning off when False.
    """

    kind: str
    path: str
    engine: str | None = None
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    structure: str | None = None
    ort_spinning: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CHILD_KINDS:
            raise ValueError(f"unknown variant kind {self.kind!r}; accepted: {', '.join(CHILD_KINDS)}")
        if self.kind == "eager" and not self.model:
            raise ValueError("an 'eager' variant needs model= (a timm model name) and path= (its state_dict file)")


# Runs in a fresh interpreter and imports only what its runtime needs (onnxruntime children never import
# torch). Prints one line "PQV_TIMING <json>" with the per-call wall-clock and process CPU times in ms.
_CHILD = r"""
import json, os, sys, time
spec, shape, threads, warmup, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
kind = spec["kind"]
if kind == "onnx":
    import numpy as np
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spec["ort_spinning"]:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(spec["path"], sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    run = lambda: sess.run(None, feed)
else:
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(shape)
    if kind == "executorch":
        # the extension module itself: executorch.runtime would also import executorch.exir (seconds)
        from executorch.extension.pybindings import _C
        _C._unsafe_reset_threadpool(threads)
        with open(spec["path"], "rb") as f:
            data = f.read()
        program = _C._load_program_from_buffer(data, enable_etdump=False, debug_buffer_size=0,
                                               program_verification=_C.Verification.InternalConsistency,
                                               data_path=None)
        method = program.load_method("forward")
        run = lambda: method([x])
    else:
        if spec["engine"]:
            torch.backends.quantized.engine = spec["engine"]
        if kind == "eager":
            import timm
            module = timm.create_model(spec["model"], pretrained=False, **spec["model_kwargs"])
            if spec["structure"]:
                from pqv_lightning.pruning import apply_structure
                with open(spec["structure"]) as f:
                    apply_structure(module, json.load(f))
            module.load_state_dict(torch.load(spec["path"], map_location="cpu", weights_only=True))
            module.eval()
        elif kind == "lite":
            from torch.jit.mobile import _load_for_lite_interpreter
            module = _load_for_lite_interpreter(spec["path"], map_location="cpu")
        else:
            module = torch.jit.load(spec["path"], map_location="cpu").eval()
        def run():
            with torch.inference_mode():
                return module(x)
for _ in range(warmup):
    run()
wall, cpu = [], []
for _ in range(runs):
    c0, t0 = time.process_time(), time.perf_counter()
    run()
    wall.append((time.perf_counter() - t0) * 1e3)
    cpu.append((time.process_time() - c0) * 1e3)
print("PQV_TIMING " + json.dumps({"wall_ms": wall, "cpu_ms": cpu}))
"""


def time_in_fresh_process(
    variant: Variant,
    input_shape: list[int],
    threads: int,
    warmup: int,
    runs: int,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> tuple[list[float], list[float]]:
    """Per-call wall-clock and process-CPU milliseconds of ``runs`` calls after ``warmup`` in a new process
    (environment: this one's, ``OMP_NUM_THREADS=threads``, then ``env``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", **(env or {})}
    args = [sys.executable, "-c", _CHILD, json.dumps(asdict(variant)), json.dumps([int(s) for s in input_shape])]
    proc = subprocess.run(
        [*args, str(threads), str(warmup), str(runs)], capture_output=True, text=True, env=env, timeout=timeout
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PQV_TIMING "):
            result = json.loads(line.split(" ", 1)[1])
            return result["wall_ms"], result["cpu_ms"]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"timing child for {variant.kind} {variant.path} failed (rc {proc.returncode}): {tail}")


@dataclass(frozen=True)
class ProcessLatency:
    """Wall-clock latency pooled over all rounds, the median process CPU time per call (all threads; less
    sensitive to other load than wall-clock), and each round's wall-clock median."""

    stats: LatencyStats
    cpu_median_ms: float
    round_medians_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return self.stats.median_ms

    @property
    def p90_ms(self) -> float:
        return self.stats.p90_ms


def interleaved_process_latency(
    variants: dict[str, Variant],
    input_shape: list[int],
    threads: int,
    warmup: int,
    runs: int,
    rounds: int,
    progress: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, ProcessLatency]:
    """Time every variant in ``rounds`` alternating rounds, each round one fresh process per variant running
    ``warmup`` untimed and ``ceil(runs / rounds)`` timed calls; the starting variant rotates every round.
    ``env`` is added to every timing process's environment. With a ``failures`` dict, a variant whose
    process fails is dropped (the reason stored there under its label) instead of ending the whole run."""
    if not variants:
        raise ValueError("variants is empty: nothing to time")
    for name, value in (("threads", threads), ("runs", runs), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup!r} is invalid; accepted: an int >= 0")
    per_round = -(-runs // rounds)
    labels = list(variants)
    wall: dict[str, list[float]] = {lab: [] for lab in labels}
    cpu: dict[str, list[float]] = {lab: [] for lab in labels}
    medians: dict[str, list[float]] = {lab: [] for lab in labels}
    for r in range(rounds):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            if failures is not None and label in failures:
                continue
            try:
                w, c = time_in_fresh_process(variants[label], input_shape, threads, warmup, per_round, env=env)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if failures is None:
                    raise
                failures[label] = str(e)
                continue
            wall[label] += w
            cpu[label] += c
            medians[label].append(statistics.median(w))
        if progress is not None:
            progress(f"round {r + 1}/{rounds} done (load {load_average()})")
    return {
        lab: ProcessLatency(LatencyStats.from_samples(wall[lab]), statistics.median(cpu[lab]), tuple(medians[lab]))
        for lab in labels
        if failures is None or lab not in failures
    }
