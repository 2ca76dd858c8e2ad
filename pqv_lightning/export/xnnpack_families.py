"""The blocks of timm's mobile and ViT-relative families rewritten so that ExecuTorch delegates them to XNNPACK.

Each rewrite computes the same function as the block it replaces (eval mode), dense or pruned (the pruned forward
classes of :mod:`pqv_lightning.pruning.families` are rewritten alike). Why each is needed (executorch 1.5.x):

* Learned attention biases gathered by an index buffer (``attention_biases[:, idxs]``: LeViT, EfficientFormer(V2),
  TinyViT, EfficientViT-M; relative-position tables: Swin, BEiT; SwinV2's bias MLP on a fixed coordinate table)
  lower to ``index.Tensor`` (or ``addmm`` on a constant), which XNNPACK has no config for. They do not depend on
  the input: computed once here and kept as a constant buffer.
* q/k/v biases kept apart and concatenated in the forward (BEiT, EVA, SwinV2): the linear layer's bias is then
  not a static tensor and the projection stays outside as ``addmm``. Folded into the qkv layer's bias.
* ``F.normalize`` (SwinV2's cosine attention, XCA) decomposes into ``pow``/``sum``/``pow(0.5)``; written as
  ``x * rsqrt(clamp(sum(x * x), eps**2))`` with the sum as a mean times a float (delegated); likewise the sums of
  MobileViTV2's linear attention and ConViT's gated attention.
* Fourier position features (XCiT, EdgeNeXt) built in the forward from the feature size (arange, cumsum, pow,
  strided slices): computed once per size in numpy, a constant of the exported program. EVA's interleaved RoPE
  rotation (strided slices) on a ``[..., D / 2, 2]`` view instead.
* ``(x + x_dist) / 2`` in distilled heads (EfficientFormer(V2), LeViT): the int divisor casts (``_to_dim_order_copy``
  with a dtype change); ``* 0.5`` instead, as for DeiT.
* LeViT's strided token subsampling (``x[:, ::2, ::2]``): strided slices have no config; views and stride-1
  slices instead.
* FastViT's train-time multi-branch blocks (MobileOne, RepMixer, large-kernel and positional convolutions) add
  Python zeros for absent branches (an int cast) and run several convolutions where inference runs one: they are
  reparameterised (``reparameterize()``, timm's own inference form).
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import (
    beit,
    convit,
    edgenext,
    efficientformer,
    efficientformer_v2,
    efficientvit_msra,
    eva,
    fastvit,
    levit,
    mobilevit,
    swin_transformer,
    swin_transformer_v2,
    tiny_vit,
    xcit,
)
from torch import Tensor, nn

from pqv_lightning.pruning.families.beit import PrunedBeitAttention
from pqv_lightning.pruning.families.convit import PrunedGPSA
from pqv_lightning.pruning.families.edgenext import PrunedCrossCovarianceAttn
from pqv_lightning.pruning.families.eva import PrunedEvaAttention
from pqv_lightning.pruning.families.layers import merge_heads, split_heads
from pqv_lightning.pruning.families.swin import PrunedWindowAttentionV2
from pqv_lightning.pruning.families.xcit import PrunedXCA

__all__ = ["FAMILY_REWRITES"]


def _l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=-1)`` from delegated ops."""
    return x * torch.rsqrt(torch.clamp(x.mul(x).mean(dim=-1, keepdim=True) * float(x.shape[-1]), min=eps * eps))


def _sum_last(x: Tensor) -> Tensor:
    return x.mean(dim=-1, keepdim=True) * float(x.shape[-1])


# --------------------------------------------------------------------------- constant attention biases
@torch.no_grad()
def _constant_attention_biases(module: nn.Module) -> None:
    bias = module.attention_biases[:, module.attention_bias_idxs].detach().clone()
    module.register_buffer("pqv_attention_bias", bias, persistent=False)
    module.get_attention_biases = types.MethodType(lambda self, device: self.pqv_attention_bias, module)


@torch.no_grad()
def _constant_relative_position_bias(module: nn.Module) -> None:
    if getattr(module, "relative_position_bias_table", None) is None:
        return
    module.register_buffer("pqv_rel_pos_bias", module._get_rel_pos_bias().detach().clone(), persistent=False)
    module._get_rel_pos_bias = types.MethodType(lambda self: self.pqv_rel_pos_bias, module)


@torch.no_grad()
def _fold_qkv_bias(module: nn.Module) -> None:
    """q/k/v biases into the qkv layer's bias (the forward then takes its ``q_bias is None`` path)."""
    if getattr(module, "qkv", None) is None or getattr(module, "q_bias", None) is None:
        return
    bias = torch.cat((module.q_bias, module.k_bias, module.v_bias)).detach()
    if module.qkv.bias is not None:
        bias = bias + module.qkv.bias.detach()
    module.qkv.bias = nn.Parameter(bias)
    module.q_bias = module.v_bias = None
    module.k_bias = None


class _DelegableEvaAttention(PrunedEvaAttention):
    """EVA attention whose interleaved rotation (``rot``: strided slices ``x[..., 1::2]``) is computed on a
    ``[..., D / 2, 2]`` view with stride-1 slices."""

    def rotate(self, t: Tensor, rope: Tensor) -> Tensor:
        if getattr(self, "rotate_half", False):
            return super().rotate(t, rope)
        npt = self.num_prefix_tokens
        patches = t[:, :, npt:]
        sin, cos = rope.chunk(2, -1)
        pairs = patches.reshape(*patches.shape[:-1], -1, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(patches.shape)
        return torch.cat([t[:, :, :npt], patches * cos + rotated * sin], dim=2)


def _eva_attention(module: nn.Module) -> None:
    _fold_qkv_bias(module)
    module.__class__ = _DelegableEvaAttention


def _fourier_grid(module: nn.Module, h: int, w: int) -> Tensor:
    """XCiT's Fourier position features of an ``h x w`` grid, ``[1, 2 * hidden_dim, h, w]``, computed in numpy:
    they depend only on the feature size, so the exported program holds them as a constant (timm computes them in
    the forward with arange/cumsum/pow, which XNNPACK does not take)."""
    eps, d = 1e-6, module.hidden_dim
    y = np.arange(1, h + 1, dtype=np.float32)[:, None].repeat(w, 1)
    x = np.arange(1, w + 1, dtype=np.float32)[None, :].repeat(h, 0)
    y = y / (np.float32(h) + np.float32(eps)) * np.float32(module.scale)
    x = x / (np.float32(w) + np.float32(eps)) * np.float32(module.scale)
    dim_t = np.float32(module.temperature) ** (2 * (np.arange(d) // 2).astype(np.float32) / np.float32(d))

    def features(grid: np.ndarray) -> np.ndarray:
        pos = grid[:, :, None] / dim_t
        return np.stack([np.sin(pos[:, :, 0::2]), np.cos(pos[:, :, 1::2])], axis=3).reshape(h, w, d)

    pos = np.concatenate([features(y), features(x)], axis=2).transpose(2, 0, 1)[None]
    return torch.from_numpy(np.ascontiguousarray(pos)).to(module.token_projection.weight.dtype)


class _DelegableXCiTPositions(xcit.PositionalEncodingFourier):
    def forward(self, B: int, H: int, W: int) -> Tensor:
        return self.token_projection(_fourier_grid(self, H, W)).expand(B, -1, -1, -1)


class _DelegableEdgeNeXtPositions(edgenext.PositionalEncodingFourier):
    def forward(self, shape: tuple[int, int, int]) -> Tensor:
        b, h, w = shape
        return self.token_projection(_fourier_grid(self, h, w)).expand(b, -1, -1, -1)


def _beit_attention(module: nn.Module) -> None:
    _fold_qkv_bias(module)
    _constant_relative_position_bias(module)


# --------------------------------------------------------------------------- SwinV2
class _DelegableWindowAttentionV2(PrunedWindowAttentionV2):
    """SwinV2 window attention with its bias (16 sigmoid of the bias MLP on the coordinate table) and logit
    scale as constants, and the cosine similarity from delegated ops."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        n = x.shape[1]
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        attn = (_l2_normalize(q) @ _l2_normalize(k).transpose(-2, -1)) * self.pqv_logit_scale + self.pqv_bias
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        return self.proj(merge_heads(self.softmax(attn) @ v))


@torch.no_grad()
def _swinv2_attention(module: nn.Module) -> None:
    _fold_qkv_bias(module)
    table = module.cpb_mlp(module.relative_coords_table).view(-1, module.num_heads)
    area = module.window_size[0] * module.window_size[1]
    bias = table[module.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
    module.register_buffer("pqv_bias", (16 * torch.sigmoid(bias)).unsqueeze(0).contiguous(), persistent=False)
    scale = torch.clamp(module.logit_scale, max=torch.log(torch.tensor(1.0 / 0.01))).exp()
    module.register_buffer("pqv_logit_scale", scale.detach().clone(), persistent=False)
    module.__class__ = _DelegableWindowAttentionV2


# --------------------------------------------------------------------------- normalisations and sums
class _DelegableXCA(PrunedXCA):
    """Cross-covariance attention (XCiT's and EdgeNeXt's) with the token normalisation from delegated ops."""

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 4, 1).unbind(0)
        attn = ((_l2_normalize(q) @ _l2_normalize(k).transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, -1))


class _DelegableEdgeNeXtXCA(PrunedCrossCovarianceAttn):
    forward = _DelegableXCA.forward


class _DelegableLinearSelfAttention(mobilevit.LinearSelfAttention):
    """MobileViTV2's separable attention with the context sum as a mean times the token count."""

    def forward(self, x: Tensor, x_prev: Tensor | None = None) -> Tensor:
        if x_prev is not None:
            return super().forward(x, x_prev)
        query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        context = _sum_last(key * F.softmax(query, dim=-1))
        return self.out_proj(F.relu(value) * context.expand_as(value))


class _DelegableGPSA(PrunedGPSA):
    """ConViT's gated positional attention with the renormalising sum as a mean times the token count."""

    @staticmethod
    def renormalise(attn: Tensor) -> Tensor:
        return attn / _sum_last(attn)


# --------------------------------------------------------------------------- distilled heads
class _DelegableEfficientFormer(efficientformer.EfficientFormer):
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.distilled_training and self.training:
            return super().forward_head(x, pre_logits)
        x = self.head_drop(x.mean(dim=1) if self.global_pool == "avg" else x)
        return x if pre_logits else (self.head(x) + self.head_dist(x)) * 0.5


class _DelegableEfficientFormerV2(efficientformer_v2.EfficientFormerV2):
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.head_dist is None or (self.distilled_training and self.training):
            return super().forward_head(x, pre_logits)
        x = self.head_drop(x.mean(dim=(2, 3)) if self.global_pool == "avg" else x)
        return x if pre_logits else (self.head(x) + self.head_dist(x)) * 0.5


class _DelegableLevitDistilled(levit.LevitDistilled):
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.distilled_training and self.training:
            return super().forward_head(x, pre_logits)
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1)) if self.use_conv else x.mean(dim=1)
        return x if pre_logits else (self.head(x) + self.head_dist(x)) * 0.5


class _DelegableSubsample(levit.Downsample):
    """LeViT's strided token subsampling (``x[:, ::s, ::s]`` has no delegable form) as views and stride-1 slices
    when the resolution is a multiple of the stride."""

    def forward(self, x: Tensor) -> Tensor:
        (h, w), s = self.resolution, self.stride
        if self.pool is not None or h % s or w % s:
            return super().forward(x)
        b, _, c = x.shape
        x = x.reshape(b * h // s, s, w, c)[:, 0]
        return x.reshape(b * h // s, w // s, s, c)[:, :, 0].reshape(b, -1, c)


def _reparameterize(module: nn.Module) -> None:
    module.reparameterize()


#: (module type, rewrite) pairs, registered by :mod:`pqv_lightning.export.xnnpack_rewrites`.
FAMILY_REWRITES: tuple[tuple[type[nn.Module], object], ...] = (
    *(
        (t, _constant_attention_biases)
        for t in (
            levit.Attention,
            levit.AttentionDownsample,
            efficientformer.Attention,
            efficientformer_v2.Attention2d,
            efficientformer_v2.Attention2dDownsample,
            tiny_vit.Attention,
            efficientvit_msra.CascadedGroupAttention,
        )
    ),
    (swin_transformer.WindowAttention, _constant_relative_position_bias),
    *((t, _beit_attention) for t in (beit.Attention, PrunedBeitAttention)),
    *((t, _eva_attention) for t in (eva.EvaAttention, PrunedEvaAttention)),
    (xcit.PositionalEncodingFourier, _DelegableXCiTPositions),
    (edgenext.PositionalEncodingFourier, _DelegableEdgeNeXtPositions),
    *((t, _swinv2_attention) for t in (swin_transformer_v2.WindowAttention, PrunedWindowAttentionV2)),
    *((t, _DelegableXCA) for t in (xcit.XCA, PrunedXCA)),
    *((t, _DelegableEdgeNeXtXCA) for t in (edgenext.CrossCovarianceAttn, PrunedCrossCovarianceAttn)),
    (mobilevit.LinearSelfAttention, _DelegableLinearSelfAttention),
    *((t, _DelegableGPSA) for t in (convit.GPSA, PrunedGPSA)),
    (efficientformer.EfficientFormer, _DelegableEfficientFormer),
    (efficientformer_v2.EfficientFormerV2, _DelegableEfficientFormerV2),
    (levit.LevitDistilled, _DelegableLevitDistilled),
    (levit.Downsample, _DelegableSubsample),
    *(
        (t, _reparameterize)
        for t in (
            fastvit.MobileOneBlock,
            fastvit.ReparamLargeKernelConv,
            fastvit.RepMixer,
            fastvit.RepConditionalPosEnc,
        )
    ),
)
