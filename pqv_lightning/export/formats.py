"""The export formats by name: their file suffixes, the precisions each takes, and what loading one gives.

A leaf module (no torch, no other module of the package): the format modules, the loader and every process
that only runs a file import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqv_lightning.utils.checks import check_choice, check_choices, invalid

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "AOTI_PRECISIONS",
    "ATTENTION_PRECISIONS",
    "DEFAULT_FORMATS",
    "EXECUTORCH_PRECISIONS",
    "FORMATS",
    "FP16_ATTENTION_PRECISIONS",
    "ONNX_PRECISIONS",
    "SUFFIXES",
    "TORCHSCRIPT_METHODS",
    "LoadedArtifact",
    "check_attention",
    "format_of",
    "validate_formats",
    "validate_precisions",
]

FORMATS = ("torchscript", "lite", "executorch", "onnx", "aoti")
#: What is exported when nothing is said: the mobile and portable formats. AOTInductor packages are compiled
#: for the exporting machine's x86 CPU (a C++ compiler and tens of seconds a file), so they are asked for by name.
DEFAULT_FORMATS = ("torchscript", "lite", "executorch", "onnx")
SUFFIXES = {".pt": "torchscript", ".ptl": "lite", ".pte": "executorch", ".onnx": "onnx", ".pt2": "aoti"}
# "int8": static pt2e (calibrated); "int8_dynamic": pt2e dynamic activations; "int4": torchao int4
# weights (see pqv_lightning.export.executorch.export_pte).
EXECUTORCH_PRECISIONS = ("fp32", "int8", "int8_dynamic", "int4")
#: The dtypes the attention products of a ``.pte`` can run in (``fp16``: native on CPUs with fp16 arithmetic).
ATTENTION_PRECISIONS = ("fp32", "fp16")
#: ``.pte`` precisions that take fp16 attention. Not static ``int8``: ExecuTorch 1.5's XNNPACK
#: ``RemoveRedundantCopyPass`` takes a dtype cast between static q/dq nodes for a layout copy and drops it.
FP16_ATTENTION_PRECISIONS = ("fp32", "int8_dynamic", "int4")
# "int8": onnxruntime dynamic quantization (no calibration) of the onnxruntime-optimized graph (see
# pqv_lightning.export.onnx); "int8_qdq": static QDQ from calibration images.
ONNX_PRECISIONS = ("fp32", "int8", "int8_qdq")
# "int8": PT2E with torchao's X86InductorQuantizer (static, calibrated), lowered to oneDNN int8 kernels (see
# pqv_lightning.export.aoti).
AOTI_PRECISIONS = ("fp32", "int8")
# Quantization methods whose eager module TorchScript can take (torch.ao int8, half precision). pt2e graphs
# and torchao int4 tensor subclasses are not: their deployment formats are ExecuTorch and ONNX.
TORCHSCRIPT_METHODS = ("fp16", "int8_dynamic", "int8_static")


def validate_formats(formats: Sequence[str], name: str = "formats") -> tuple[str, ...]:
    """``formats`` (one name or several) as a de-duplicated tuple; at least one."""
    return check_choices(name, formats, FORMATS)


def validate_precisions(values: Sequence[str], accepted: Sequence[str], what: str) -> tuple[str, ...]:
    """``values`` as a de-duplicated tuple of members of ``accepted``, checked as the ``{what}_precisions``
    argument; empty means that format writes nothing."""
    return check_choices(f"{what}_precisions", values, accepted, allow_empty=True)


def check_attention(attention: str, executorch_precisions: Sequence[str], name: str = "attention") -> str:
    """``attention`` checked against the ``.pte`` precisions it is asked for with."""
    check_choice(name, attention, ATTENTION_PRECISIONS)
    refused = [p for p in executorch_precisions if attention != "fp32" and p not in FP16_ATTENTION_PRECISIONS]
    if refused:
        raise invalid(
            name, attention, f"'fp32' with executorch precision {', '.join(map(repr, refused))}; fp16 attention is "
            f"exported with {', '.join(FP16_ATTENTION_PRECISIONS)} (static int8 loses its casts in ExecuTorch 1.5)",
        )  # fmt: skip
    return attention


def format_of(path: str | os.PathLike) -> str:
    """The format of a file, from its suffix (``.pt``, ``.ptl``, ``.pte``, ``.onnx``, ``.pt2``)."""
    suffix = Path(path).suffix
    if suffix not in SUFFIXES:
        raise invalid("path", str(path), f"a file whose suffix names its format: {', '.join(SUFFIXES)}")
    return SUFFIXES[suffix]


@dataclass(frozen=True)
class LoadedArtifact:
    """A file loaded in its own runtime (what :func:`pqv_lightning.export.load_artifact` returns).

    ``run(x)`` takes one input in the runtime's own array type (numpy for onnxruntime, a torch tensor for the
    others) and returns its first output; ``bind(x)`` returns the zero-argument call on that fixed input that
    latency is timed on (feeds built once, no context the runtime does not need). Both hold the runtime's
    objects for as long as they live: an ExecuTorch method must not outlive its program.
    """

    kind: str
    run: Callable[[Any], Any]
    bind: Callable[[Any], Callable[[], Any]]
    takes_numpy: bool = False

    def predict(self, x: Tensor) -> Tensor:
        """``run`` on a torch tensor, returning a tensor (imports torch: for verification and in-process timing)."""
        import torch

        if self.takes_numpy:
            return torch.from_numpy(self.run(x.detach().cpu().contiguous().numpy()))
        return torch.as_tensor(self.run(x))
