"""AOTInductor packages (``.pt2``): the model compiled ahead of time for the x86 CPU that builds it.

Why another runtime: the ``.pte`` is the phone file (XNNPACK, ARM-first kernels), the ONNX file runs onnxruntime's
MLAS kernels; both use AVX-512 VNNI at best and neither the AMX-INT8/BF16 tiles of newer Xeons. An AOTInductor
package is a shared library that Inductor generated and compiled for this machine, its linear layers calling
oneDNN (VNNI and AMX kernels where the CPU has them) and the rest fused into generated C++ loops. It loads with
``torch._inductor.aoti_load_package`` (Python, or ``AOTIModelPackageLoader`` in C++), without the training code.

Precisions:

* ``fp32``: Inductor with freezing (weights pre-packed for oneDNN, the rest fused into generated C++ loops);
* ``int8``: torchao PT2E with the ``X86InductorQuantizer`` (per-channel symmetric weights, static per-tensor
  activations calibrated on images), lowered to ``onednn::qlinear_pointwise`` (VNNI / AMX-INT8).

Inductor must compile with freezing and under ``no_grad``: otherwise it folds the dequantized weights into fp32
matrix multiplications and the "int8" file computes in fp32 (pytorch/ao#4566). So the package is inspected after
compiling: an ``int8`` package without quantized linear kernels fails (``extra["int8_kernels"]`` counts them).

Building needs a C++ compiler (Inductor's: ``$CXX``, else ``g++``/``clang++``) and takes tens of seconds to
minutes; the package is compiled for the vector ISA Inductor picks on the building CPU (``extra["vec_isa"]``) and
runs on CPUs that have it. Running uses torch's OpenMP threads (``torch.set_num_threads``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pqv_lightning.export.eager import random_tensor, set_torch_threads
from pqv_lightning.export.formats import LoadedArtifact, get_format
from pqv_lightning.export.inputs import check_tensor, described
from pqv_lightning.utils.checks import check_choice, invalid
from pqv_lightning.utils.io import atomic_write

if TYPE_CHECKING:
    from pqv_lightning.export.writer import ArtifactWriter, ExportJob

__all__ = ["compile_package", "kernel_counts", "load", "prepare_runtime", "random_input", "write"]

log = logging.getLogger(__name__)

_KERNEL_CALL = re.compile(r"aoti_torch_cpu_(\w+?)(?:_out)?\(")
_INT8_KERNELS = ("_qlinear_pointwise", "_qconv_pointwise")


def _compiler_missing() -> str | None:
    """Why Inductor cannot build here (no C++ compiler), or ``None``."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # RuntimeError "Failed to find a working C++ compiler" and friends
        return f"AOTInductor needs a C++ compiler (set CXX or install g++/clang++): {e}"
    return None


@contextlib.contextmanager
def _inductor_noise_silenced() -> Iterator[None]:
    """Inductor's mkldnn lowerings warn about tensor copies they make themselves; nothing for a user to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        yield


def compile_package(
    model: nn.Module,
    example_input: Tensor,
    path: str | Path,
    precision: str = "fp32",
    calibration: Sequence[Tensor] | None = None,
    float_layers: Sequence[str] = (),
) -> dict:
    """Compile ``model`` for ``example_input``'s shape into the AOTInductor package ``path`` (written atomically).

    ``precision="int8"`` quantizes first (:func:`pqv_lightning.quantization.quantize_pt2e` with the x86 backend,
    calibrated on ``calibration``; ``float_layers`` stay in float). Returns facts for the manifest: the kernels
    the package calls (``kernels``), the quantized ones among them (``int8_kernels``), the vector ISA compiled
    for. Raises when Inductor is unavailable here or an ``int8`` package came out without int8 kernels.
    """
    check_choice("precision", precision, get_format("aoti").precisions)
    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    check_tensor("example_input", example_input)
    if precision == "int8" and not calibration:
        raise invalid("calibration", described(calibration), "image batches: aoti 'int8' (static) calibrates on them")
    if float_layers and precision == "fp32":
        raise invalid("float_layers", list(float_layers), "none for precision 'fp32'")
    missing = _compiler_missing()
    if missing is not None:
        raise RuntimeError(missing)
    from torch._inductor import aoti_compile_and_package

    from pqv_lightning.quantization import quantize_pt2e

    was_training = model.training
    model.eval()  # the float file computes what inference does (dropout off, batch norms frozen)
    try:
        work = model
        if precision == "int8":
            work = quantize_pt2e(model, "x86", example_input, calibration, float_layers=tuple(float_layers))
        with torch.no_grad():
            exported = torch.export.export(work, (example_input,), strict=False)
    finally:
        model.train(was_training)
    facts: dict = {}
    with torch.no_grad(), _inductor_noise_silenced():

        def write(tmp: Path) -> None:
            staged = tmp.with_suffix(".pt2")  # the packager takes only paths ending in .pt2
            try:
                aoti_compile_and_package(exported, package_path=str(staged), inductor_configs={"freezing": True})
                facts.update(_inspect(staged, precision))  # before the file is in place: a wrong one never is
                os.replace(staged, tmp)
            finally:
                staged.unlink(missing_ok=True)

        atomic_write(path, write)
    if precision != "fp32":
        facts["float_layers"] = list(float_layers)
    return facts


def _inspect(package: Path, precision: str) -> dict:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    kernels = kernel_counts(package)
    int8 = sum(n for name, n in kernels.items() if name.startswith(_INT8_KERNELS))
    if precision == "int8" and int8 == 0:
        raise RuntimeError(
            f"the int8 package calls no quantized kernels (only {', '.join(kernels) or 'none'}): Inductor did not "
            "lower the quantized layers and would compute in fp32"
        )
    return {"kernels": kernels, "int8_kernels": int8, "vec_isa": str(pick_vec_isa() or "none")}


def kernel_counts(path: str | Path) -> dict[str, int]:
    """The ATen/oneDNN kernels the package's generated wrapper calls, with their call sites (fused C++ loops,
    Inductor's own code, are not listed)."""
    counts: dict[str, int] = {}
    with zipfile.ZipFile(path) as package:
        for name in package.namelist():
            if name.endswith("wrapper.cpp"):
                for call in _KERNEL_CALL.findall(package.read(name).decode(errors="replace")):
                    counts[call] = counts.get(call, 0) + 1
    return dict(sorted(counts.items()))


def write(writer: ArtifactWriter, model: nn.Module, job: ExportJob) -> None:
    """Write and verify one ``.pt2`` per precision of ``job`` (the format protocol); the int8 package keeps its
    float layers in float."""
    for precision in job.artifacts.get("aoti", ()):
        build = functools.partial(
            _build,
            model=job.model_for("aoti", precision, model),
            example=writer.example_input,
            precision=precision,
            calibration=job.calibration,
            float_layers=job.keep("aoti", precision),
        )
        writer.produce(f"aoti-{precision}", "aoti", precision, "x86", f"{precision}.pt2", build, _verifier)


def _build(path: Path, extra: dict, *, model, example, precision, calibration, float_layers) -> None:
    from pqv_lightning.tokens import token_summary

    extra.update(compile_package(model, example, path, precision, calibration, float_layers))
    summary = token_summary(model, example.shape[-2:])
    if summary is not None:
        extra["tokens"] = summary


def _verifier(path: Path):
    return load(str(path), "aoti", None, None, False).predict


# --------------------------------------------------------------------------- run


def load(path: str, kind: str, threads: int | None, engine: str | None, ort_spinning: bool) -> LoadedArtifact:
    """A ``.pt2`` package loaded by ``torch._inductor.aoti_load_package`` (``engine`` and ``ort_spinning`` do not
    apply); run under ``inference_mode``."""
    from torch._inductor import aoti_load_package

    prepare_runtime(threads)
    compiled = aoti_load_package(path)

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            out = compiled(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def bind(x: Tensor):
        return lambda: run(x)

    return LoadedArtifact(kind, run, bind)


def prepare_runtime(threads: int | None) -> None:
    """Fix torch's intra-op (OpenMP) threads, which the generated kernels use (``None``: leave them)."""
    set_torch_threads(threads)


def random_input(shape: list[int]) -> Tensor:
    return random_tensor(shape)
