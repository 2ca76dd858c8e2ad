"""Hardware-friendly widths: the channel multiple each deployment kernel runs fastest (``round_to="auto"``).

An int8 GEMM kernel computes its output columns in tiles and packs its inputs in groups (XNNPACK's x86
``qd8-f32-qc8w`` kernels and oneDNN's VNNI kernels take 4 int8 values per 32-bit lane; onnxruntime's MLAS packs
weights in column blocks), so a width just past a multiple costs part of an extra tile for nothing. Kept counts
rounded down to that multiple give the same latency for fewer MACs.

The table is what ``benchmarks/width_tiles.py --quick`` measured on an AMD EPYC (Zen 4, AVX-512 VNNI, no AMX, 2
threads): a deit_small MLP block at hidden widths 1152..1216, latency per MAC of the widths that are multiples of
``m`` against all widths, the preferred multiple being the smallest ``m`` past which a larger one gains under 2%.
The effects were small (XNNPACK -0.4..+0.9%, onnxruntime +0.7..+3.0%, oneDNN -2.4..+1.3% for m = 4..64, about
the timing noise), so the table is a floor that costs almost no accuracy, not a large speed-up; run the benchmark
again on the CPU you deploy to. ``torch`` (eager / TorchScript fp32) was not measured and takes oneDNN's value.
"""

from __future__ import annotations

from pqv_lightning.export.formats import format_names, get_format, list_formats
from pqv_lightning.utils.checks import invalid

__all__ = ["KERNEL_MULTIPLE", "KERNEL_OF", "kernel_multiple", "resolve_round_to"]

#: The kernel library behind each artifact kind and the output-channel multiple it prefers, as each registered
#: format declares them (measured by ``benchmarks/width_tiles.py``); the eager model runs torch's kernels.
KERNEL_OF = {"eager": "torch", **{f.name: f.kernel for f in list_formats()}}
KERNEL_MULTIPLE = {"torch": 4, **{f.kernel: f.kernel_multiple for f in list_formats()}}


def kernel_multiple(artifact: str) -> int:
    """The channel multiple that the kernels of ``artifact`` (a latency target kind) run fastest."""
    fmt = artifact.split("-", 1)[0] if isinstance(artifact, str) else None
    if fmt == "eager":
        return KERNEL_MULTIPLE["torch"]
    if fmt not in format_names():
        raise invalid("latency_target", artifact, f"an artifact kind of one of eager, {', '.join(format_names())}")
    return get_format(fmt).kernel_multiple


def resolve_round_to(round_to: int | str | None, artifact: str) -> int | None:
    """``round_to`` as PruningSpec takes it: ``"auto"`` becomes :func:`kernel_multiple` of ``artifact``."""
    if round_to == "auto":
        return kernel_multiple(artifact)
    if isinstance(round_to, str):
        accepted = "None, a positive int or 'auto' (the multiple of the latency_target's kernels)"
        raise invalid("round_to", round_to, accepted)
    return round_to
