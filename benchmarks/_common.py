"""Helpers shared by the benchmark scripts: CPU model and ISA flags, fixed thread counts, the header line.

The timing loop itself is the library's (:func:`pqv_lightning.measure.interleaved_latency`, round-robin
so that load from other processes hits every variant alike).
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

from pqv_lightning.measure import LatencyStats, interleaved_latency, set_threads

__all__ = ["CpuInfo", "LatencyStats", "cpu_info", "fix_threads", "header", "interleaved_latency", "ratio"]

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int

    @property
    def vnni(self) -> bool:
        """AVX-512 VNNI (int8 dot products in 512-bit registers), what the INT8 speed targets assume."""
        return "avx512_vnni" in self.flags

    @property
    def amx(self) -> bool:
        return "amx_int8" in self.flags

    def isa(self) -> str:
        return " ".join(f"{f}={'yes' if f in self.flags else 'no'}" for f in ISA_FLAGS)


def cpu_info() -> CpuInfo:
    """CPU model name and flags of the first processor in ``/proc/cpuinfo`` (``platform`` off Linux)."""
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


def fix_threads(threads: int) -> dict[str, int]:
    """Fix torch intra-op (and, if still possible, inter-op) threads and the ExecuTorch XNNPACK threadpool
    to ``threads``; onnxruntime sessions get theirs from :func:`pqv_lightning.measure.make_runner`.
    ``OMP_NUM_THREADS`` is exported for child processes."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(threads)
    return set_threads(threads)


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
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n".join(
        [
            f"CPU: {cpu.model} ({cpu.cores} logical cores) | avx512_vnni: {'yes' if cpu.vnni else 'NO'}",
            f"ISA: {cpu.isa()}",
            f"load average (1/5/15 min) at start: {load}",
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
