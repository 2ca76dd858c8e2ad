"""Checks of the tensors the exporter and the runtimes are given.

Errors take the one message form of :mod:`pqv_lightning.utils.checks`, but show a tensor by its shape and
dtype: its repr would print the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from pqv_lightning.utils.checks import invalid

__all__ = ["check_example_input", "check_float_tensor", "check_tensor", "check_val_batches", "described"]


class _Described:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"<{self.text}>"


def described(value: Any) -> Any:
    """``value`` as an error message shows it: a tensor (or any object without a short repr) by a summary."""
    if isinstance(value, Tensor):
        return _Described(f"{value.dim()}-D tensor of shape {list(value.shape)}, dtype {value.dtype}")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, (str, int, float, bool)) for v in value):
        return value
    size = f" of {len(value)} items" if isinstance(value, (list, tuple, dict)) else ""
    return _Described(f"{type(value).__name__}{size}")


def check_tensor(name: str, value: Any) -> Tensor:
    """``value`` if it is a tensor."""
    if not isinstance(value, Tensor):
        raise invalid(name, described(value), "a torch.Tensor")
    return value


def check_float_tensor(name: str, value: Any) -> Tensor:
    """``value`` if it is a floating-point tensor."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise invalid(name, described(value), "a float tensor")
    return value


def check_example_input(example_input: Any) -> Tensor:
    """The fixed input an artifact is exported for: a 4-D float image batch ``[B, C, H, W]``."""
    if not isinstance(example_input, Tensor) or example_input.dim() != 4:
        raise invalid("example_input", described(example_input), "a 4-D image tensor [B, C, H, W]")
    return check_float_tensor("example_input", example_input)


def check_val_batches(val_batches: Sequence, example_input: Tensor) -> None:
    """``(images, labels)`` pairs whose images have ``example_input``'s channels and size; at least one."""
    if len(val_batches) == 0:
        raise invalid(
            "val_batches", val_batches, "one or more (images, labels) batches: every artifact is verified on them"
        )
    chw = ", ".join(map(str, example_input.shape[1:]))
    for i, batch in enumerate(val_batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise invalid(f"val_batches[{i}]", described(batch), "an (images, labels) pair")
        images, labels = batch
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1:] != example_input.shape[1:]:
            raise invalid(f"val_batches[{i}][0]", described(images), f"images [B, {chw}] like example_input")
        if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
            raise invalid(f"val_batches[{i}][1]", described(labels), f"a [{images.shape[0]}] tensor of class labels")
