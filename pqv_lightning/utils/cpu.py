"""The CPU this process runs on: its model, ISA flags and cores (int8 kernels and speed-ups depend on the ISA)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

__all__ = ["ISA_FLAGS", "CpuInfo", "cpu_info"]

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

    @property
    def int8_dot_products(self) -> bool:
        """Whether int8 GEMM kernels have a dot-product instruction: VNNI (AVX-512 or AVX) on x86, any other
        architecture assumed so (ARM's sdot). Without it, x86 kernels multiply u8 x s8 pairs into int16 with
        saturation (``vpmaddubsw``), which 8-bit weights can overflow."""
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
            return True
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    def isa(self) -> str:
        return " ".join(f"{f}={'yes' if f in self.flags else 'no'}" for f in ISA_FLAGS)

    def describe(self) -> str:
        return f"{self.model} ({self.cores} logical cores, VNNI: {'yes' if self.vnni else 'no'})"


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
