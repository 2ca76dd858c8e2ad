"""The patch-embedding convolution as patch rows: both rewrites (XNNPACK, onnxruntime) compute it as a linear
layer on these rows, which their quantizers treat as one more fully-connected layer."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["is_patchify_conv", "to_patches"]


def is_patchify_conv(module: nn.Module) -> bool:
    """A plain ``Conv2d`` whose stride equals its kernel: non-overlapping patches, no padding/dilation/groups."""
    return (
        type(module) is nn.Conv2d
        and tuple(module.stride) == tuple(module.kernel_size)
        and tuple(module.padding) == (0, 0)
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def to_patches(x: Tensor, kh: int, kw: int) -> tuple[Tensor, int, int]:
    """``[B, C, H, W]`` -> ``[B, gh * gw, C * kh * kw]`` rows in the order of a patchify conv's weight (rows
    and columns beyond whole patches dropped, as the conv does); also ``gh``, ``gw``."""
    b, c, height, width = x.shape
    gh, gw = height // kh, width // kw
    if (gh * kh, gw * kw) != (height, width):  # a no-op slice exports as an alias XNNPACK does not take
        x = x[:, :, : gh * kh, : gw * kw]
    return x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * kh * kw), gh, gw
