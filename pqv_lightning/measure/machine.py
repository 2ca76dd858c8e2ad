"""The machine a figure was measured on (int8 speed-ups depend on the ISA) and the thread counts it used.

Every runtime runs with a fixed, recorded thread count: torch intra-op threads (eager, TorchScript, lite),
onnxruntime ``intra_op_num_threads`` (per session, inter-op 1, idle workers do not spin), and the ExecuTorch
XNNPACK threadpool (process-global).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from pqv_lightning.export.eager import set_torch_threads
from pqv_lightning.utils.checks import check_int

__all__ = ["ISA_FLAGS", "CpuInfo", "cpu_info", "set_threads"]

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


def set_threads(threads: int) -> dict[str, int]:
    """Fix the torch intra-op thread count and the ExecuTorch XNNPACK threadpool to ``threads``.

    Both are process-global. onnxruntime takes its count per session (see
    :func:`pqv_lightning.measure.make_runner`). Returns the counts the runtimes report back.
    """
    import torch

    check_int("threads", threads, 1)
    set_torch_threads(threads)
    applied = {"torch": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        from pqv_lightning.export.executorch import set_threadpool

        applied["executorch"] = set_threadpool(threads)
    return applied
