"""The machine a figure was measured on (int8 speed-ups depend on the ISA) and the thread counts it used.

Every runtime runs with a fixed, recorded thread count: torch intra-op threads (eager, TorchScript, lite),
onnxruntime ``intra_op_num_threads`` (per session, inter-op 1, idle workers do not spin), and the ExecuTorch
XNNPACK threadpool (process-global).
"""

from __future__ import annotations

import contextlib

from pqv_lightning.export.eager import set_torch_threads
from pqv_lightning.utils.checks import check_int
from pqv_lightning.utils.cpu import ISA_FLAGS, CpuInfo, cpu_info

__all__ = ["ISA_FLAGS", "CpuInfo", "cpu_info", "set_threads"]


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
