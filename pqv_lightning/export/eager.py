"""Torch modules run in this process: eager models, and TorchScript/lite modules once loaded, run alike."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pqv_lightning.export.formats import LoadedArtifact
from pqv_lightning.quantization import quantized_engine
from pqv_lightning.utils.checks import invalid

if TYPE_CHECKING:
    from pqv_lightning.tokens import TokenReduction

__all__ = ["load_eager_model", "module_artifact", "random_tensor", "set_torch_threads"]


def set_torch_threads(threads: int | None) -> None:
    """Fix torch's intra-op thread count (process-global); ``None`` leaves it as it is."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def random_tensor(shape: list[int]) -> torch.Tensor:
    """A standard-normal float32 tensor from a fixed seed (the global RNG is left alone)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def module_artifact(module: Any, kind: str = "eager", engine: str | None = None) -> LoadedArtifact:
    """``module`` (an ``nn.Module`` in eval mode, a ScriptModule or a lite module) as a :class:`LoadedArtifact`
    run under ``torch.inference_mode`` and, if given, the ``torch.backends.quantized`` ``engine`` its
    weights were packed for.

    The module is not put in eval mode here: pt2e-quantized graphs override ``eval()`` (returning None), so
    callers pass eval mode.
    """

    def run(x: torch.Tensor) -> Any:
        with quantized_engine(engine), torch.inference_mode():
            return module(x)

    def bind(x: torch.Tensor):
        if engine is not None:
            return lambda: run(x)

        def call() -> Any:
            with torch.inference_mode():
                return module(x)

        return call

    return LoadedArtifact(kind, run, bind)


def load_eager_model(
    model: str,
    state_dict_path: str,
    model_kwargs: dict | None = None,
    structure_path: str | None = None,
    tokens: TokenReduction | dict | None = None,
) -> nn.Module:
    """The timm model ``model`` (``pretrained=False``, ``model_kwargs``) in eval mode, with the weights of a
    ``state_dict`` file (read with ``weights_only=True``), after replaying the JSON pruning structure at
    ``structure_path`` (:func:`pqv_lightning.pruning.apply_structure`) so that the pruned shapes fit, then giving
    it the token reduction ``tokens`` (a :class:`~pqv_lightning.tokens.TokenReduction` or its ``as_dict()``), so
    that a timing process runs the same reducing model as the one it stands for (the reduction leaves the
    ``state_dict`` keys unchanged)."""
    from pqv_lightning.tokens import TokenReduction, apply_token_reduction

    if isinstance(tokens, dict):
        tokens = TokenReduction.from_dict(tokens)
    elif tokens is not None and not isinstance(tokens, TokenReduction):
        raise invalid("tokens", tokens, "None, a pqv_lightning.tokens.TokenReduction or its as_dict() dict")
    import timm

    module = timm.create_model(model, pretrained=False, **(model_kwargs or {}))
    if structure_path:
        from pqv_lightning.pruning import apply_structure

        with open(structure_path) as f:
            apply_structure(module, json.load(f))
    if tokens is not None:
        apply_token_reduction(module, tokens)
    module.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return module.eval()
