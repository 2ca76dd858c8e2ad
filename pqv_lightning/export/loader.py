"""The one way to load an exported file and run it, in its own runtime and nothing else.

The format module is imported on demand, and each imports only its runtime: a process that runs one ``.onnx``
file imports onnxruntime and numpy but not torch, and one that runs a ``.pte`` file imports the ExecuTorch
extension module but not ``executorch.exir`` (``executorch.runtime`` would, for seconds and tens of MiB).
This dispatcher is not in :mod:`~pqv_lightning.export.formats` because the format modules import that one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pqv_lightning.export.formats import LoadedArtifact, format_names, get_format, list_formats
from pqv_lightning.utils.checks import check_bool, check_choice, check_int, invalid

__all__ = ["load_artifact", "prepare_runtime", "random_input"]


def _module(kind: str) -> ModuleType:
    """The module of format ``kind`` (load, prepare_runtime, random_input: the format protocol)."""
    check_choice("kind", kind, format_names())
    return get_format(kind).implementation()


def load_artifact(
    path: str | os.PathLike,
    kind: str,
    threads: int | None = 1,
    engine: str | None = None,
    *,
    ort_spinning: bool = False,
) -> LoadedArtifact:
    """Load ``path`` (a file of format ``kind``) in its own runtime.

    ``threads`` fixes the runtime's thread count: torch intra-op threads (TorchScript, lite), the ExecuTorch XNNPACK
    threadpool (both process-global; torch's threads also run AOTInductor packages), onnxruntime
    ``intra_op_num_threads`` per session with inter-op 1 and idle workers not spinning (``ort_spinning=True`` keeps
    onnxruntime's default, spinning); ``None`` leaves every runtime at its own default. ``engine`` is the
    ``torch.backends.quantized`` engine a torch.ao INT8 TorchScript/lite file was packed for (e.g. ``x86``).
    """
    module = _module(kind)
    check_int("threads", threads, 1, allow_none=True)
    check_bool("ort_spinning", ort_spinning)
    if engine is not None and not get_format(kind).takes_engine:
        engines = ", ".join(f.name for f in list_formats() if f.takes_engine)
        raise invalid("engine", engine, f"None for {kind} files (a torch.ao engine applies to {engines})")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no {kind} file at {str(path)!r}")
    return module.load(str(path), kind, threads, engine, ort_spinning)


def prepare_runtime(kind: str, threads: int | None = 1) -> None:
    """Import the runtime of ``kind`` and fix its threads as :func:`load_artifact` does, loading nothing
    (the baseline a fresh process's memory is compared with)."""
    check_int("threads", threads, 1, allow_none=True)
    _module(kind).prepare_runtime(threads)


def random_input(kind: str, shape: Sequence[int]) -> Any:
    """A seeded standard-normal float32 input of ``shape`` in the array type the runtime of ``kind`` takes."""
    return _module(kind).random_input([int(s) for s in shape])
