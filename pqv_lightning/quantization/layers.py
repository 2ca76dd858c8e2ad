"""Which layers a quantization method quantizes, and which of them a user keeps in float (mixed precision).

A *layer* is a module the method replaces by a quantized kernel: every ``nn.Linear``, and for PT2E also every
``nn.Conv2d`` (the patch embedding). Layers are named as in ``model.named_modules()``; a *block* is the first
numbered container on a layer's path (``blocks.3`` for ``blocks.3.mlp.fc1``), and a layer outside any block is
its own block. A float-layer selection is a list of exact names or ``fnmatch`` globs of layers or blocks
(``"head"``, ``"blocks.11"``, ``"blocks.*.mlp.fc2"``); each must match at least one layer.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from pqv_lightning.utils.checks import check_choice, invalid

__all__ = ["GRANULARITIES", "block_of", "quantizable_layers", "resolve_float_layers", "units"]

GRANULARITIES = ("layer", "block")
_LAYER_TYPES: dict[str, type[nn.Module]] = {"linear": nn.Linear, "conv2d": nn.Conv2d}


def quantizable_layers(model: nn.Module, method: str = "int8_pt2e") -> list[str]:
    """Names of the modules ``method`` quantizes, in module order (a method that casts everything: none)."""
    from pqv_lightning.quantization.methods import get_method

    kinds = tuple(_LAYER_TYPES[kind] for kind in get_method(method).layers)
    if not kinds:
        return []
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def block_of(layer: str) -> str:
    """The block of a layer name: the path up to its first numbered part, else the layer itself."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def units(layers: Sequence[str], granularity: str = "layer") -> dict[str, list[str]]:
    """The units of a sensitivity analysis or a float budget: each layer alone, or the layers of each block."""
    check_choice("granularity", granularity, GRANULARITIES)
    grouped: dict[str, list[str]] = {}
    for layer in layers:
        grouped.setdefault(layer if granularity == "layer" else block_of(layer), []).append(layer)
    return grouped


def _matches(pattern: str, layer: str) -> bool:
    if fnmatch.fnmatchcase(layer, pattern):
        return True
    # a block or container name (or a glob of them) matches every layer inside it
    parents = [".".join(layer.split(".")[:i]) for i in range(1, layer.count(".") + 1)]
    return any(fnmatch.fnmatchcase(parent, pattern) for parent in parents)


def resolve_float_layers(
    model: nn.Module, patterns: Iterable[str], method: str = "int8_pt2e", name: str = "float_layers"
) -> tuple[str, ...]:
    """The layers of ``model`` that ``patterns`` keep in float for ``method``, in module order.

    Raises naming the first pattern that matches no layer, with the closest layer and block names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    layers = quantizable_layers(model, method)
    chosen: set[str] = set()
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern.strip():
            raise invalid(f"{name}[{i}]", pattern, "a layer or block name, or a glob of them (e.g. 'blocks.*.mlp.fc2')")
        found = [layer for layer in layers if _matches(pattern.strip(), layer)]
        if not found:
            candidates = sorted(set(layers) | {block_of(layer) for layer in layers})
            close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.5)
            hint = f"names close to it: {', '.join(close)}" if close else f"one of {', '.join(candidates[:12])}"
            raise invalid(
                f"{name}[{i}]",
                pattern,
                f"a layer or block that {method} quantizes in {type(model).__name__}, or a glob matching one; {hint}",
            )
        chosen.update(found)
    return tuple(layer for layer in layers if layer in chosen)
