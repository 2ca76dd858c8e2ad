"""A model loaded in its own runtime and bound to one input: what latency is timed on.

Exported files have a fixed input shape (the one they were exported with): to measure a larger batch,
export at that batch. Eager modules take any batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pqv_lightning.export.eager import module_artifact
from pqv_lightning.export.formats import format_names, format_of, get_format
from pqv_lightning.export.inputs import check_float_tensor, described
from pqv_lightning.export.loader import load_artifact
from pqv_lightning.measure.machine import set_threads
from pqv_lightning.quantization import LEGACY_ENGINES
from pqv_lightning.utils.checks import check_choice, check_int, invalid

__all__ = ["FILE_KINDS", "KINDS", "Runner", "file_kinds", "kind_of", "kinds", "make_runner"]

#: What can be timed: a file of each registered format, or the eager model (at import; see :func:`kinds`).
FILE_KINDS = format_names()
KINDS = ("eager", *FILE_KINDS)


def file_kinds() -> tuple[str, ...]:
    """The file kinds that can be timed: every format registered now."""
    return format_names()


def kinds() -> tuple[str, ...]:
    """What can be timed: the eager model or a file of a registered format."""
    return ("eager", *format_names())


def kind_of(path: str | os.PathLike) -> str:
    """Artifact kind from a file suffix (each registered format's own)."""
    return format_of(path)


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


def make_runner(
    artifact: nn.Module | str | os.PathLike,
    kind: str,
    example_input: Tensor,
    threads: int = 1,
    engine: str | None = None,
) -> Runner:
    """Load ``artifact`` (an ``nn.Module`` in eval mode for ``"eager"``, else a file path) in its own runtime
    (:func:`pqv_lightning.export.load_artifact`).

    ``threads`` is fixed for the runtime (see :mod:`pqv_lightning.measure.machine`); ``engine`` is the
    ``torch.backends.quantized`` engine a torch.ao INT8 TorchScript/lite file was packed for (e.g. ``x86``).
    """
    check_choice("kind", kind, kinds())
    check_int("threads", threads, 1)
    check_choice("engine", engine, LEGACY_ENGINES, allow_none=True)
    check_float_tensor("example_input", example_input)
    if kind == "eager":
        if not isinstance(artifact, nn.Module):
            raise invalid("artifact", described(artifact), "an nn.Module for kind 'eager'")
    elif isinstance(artifact, nn.Module) or not Path(artifact).is_file():
        raise FileNotFoundError(f"kind {kind!r} needs the path of an existing file, got {described(artifact)!r}")
    x = example_input.detach().float().contiguous()
    set_threads(threads)
    if kind == "eager":
        loaded = module_artifact(artifact, "eager", engine)
    else:
        loaded = load_artifact(artifact, kind, threads, engine if get_format(kind).takes_engine else None)
    call = loaded.bind(x.numpy() if loaded.takes_numpy else x)
    return Runner(kind, loaded.predict, x, threads, call, keep=loaded)
