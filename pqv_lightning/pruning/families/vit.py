"""timm's ``VisionTransformer``: ViT, DeiT (incl. distilled), DeiT III, register tokens and DINOv2 layer scale
(``vit``); and its variants torch-pruning's whole-model trace cannot prune correctly (``vit_blocks``).

``vit``: torch-pruning traces the whole model (embedding width included, as its own ViT example), with timm's
``Attention`` heads declared; afterwards ``num_heads``/``head_dim``/``attn_dim`` are set and the trained softmax
scale is folded into the q rows. Prefix tokens (class, distillation, register tokens) and position embeddings are
pruned with the embedding as unwrapped parameters.

``vit_blocks``: q/k norms over the head dim (qk-norm), an output norm (scale-norm), gated attention, gated MLPs
(SwiGLU / GluMlp), attention pooling: torch-pruning's tracer fails on the per-head norms (an IndexError in its
importance), so only the inside of each block is pruned, by named couplings (MLP hidden channels, head dims with
the q/k norm channels and the output norm, or heads); the embedding width is kept and the trained scale is folded
into the q norm's affine (or the q rows).
"""

from __future__ import annotations

import math

import torch.nn as nn
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from pqv_lightning.pruning.families.base import BlockFamily, Family, Unit, kept_channels
from pqv_lightning.pruning.families.layers import ATTENTION, MLPS
from pqv_lightning.pruning.spec import PruningSpec
from pqv_lightning.pruning.structure import scale_rows

__all__ = ["ViTBlocksFamily", "ViTFamily", "whole_model_issue"]


def whole_model_issue(model: nn.Module) -> str | None:
    """Why torch-pruning's whole-model trace cannot prune this ``VisionTransformer`` correctly (``None``: it can)."""
    if getattr(model, "attn_pool", None) is not None:
        return "attention pooling (attn_pool)"
    for name, m in model.named_modules():
        cls = type(m)
        if "Attention" in cls.__name__ and cls is not Attention and "Pool" not in cls.__name__:
            return f"{name}: attention type {cls.__module__}.{cls.__name__}"
        if cls is Attention:
            bad = [
                f
                for f, ok in (
                    ("qk_norm", isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity)),
                    ("scale_norm", isinstance(m.norm, nn.Identity)),
                    ("gated", m.gate is None),
                )
                if not ok
            ]
            if bad:
                return f"{name}: Attention with {', '.join(bad)}"
            if m.qkv.out_features != 3 * m.num_heads * m.head_dim:
                return f"{name}: qkv width does not match num_heads*head_dim"
    for name, blk in model.blocks.named_children():
        if type(blk) is not Block:
            return f"blocks.{name}: block type {type(blk).__name__}"
        if not isinstance(blk.mlp, Mlp) or not isinstance(blk.mlp.norm, nn.Identity):
            return f"blocks.{name}: MLP type {type(blk.mlp).__name__} (or an MLP with a norm)"
        for ls in (blk.ls1, blk.ls2):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                return f"blocks.{name}: layer scale {type(ls).__name__}"
    return None


class ViTFamily(Family):
    name = "vit"
    description = (
        "timm VisionTransformer: vit_*, deit_* (incl. distilled), deit3_*, register tokens, DINOv2 layer scale "
        "(embedding width, MLP hidden, head dims or heads)"
    )

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer) and whole_model_issue(model) is None

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(model, n) for n in ("head", "head_dist") if isinstance(getattr(model, n, None), nn.Module)]

    def _attns(self, model: nn.Module) -> list[tuple[str, Attention]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]

    def units(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Unit]:
        ignored = list(ignored)
        if spec.bottleneck:  # as torch-pruning's ViT example: fc2 fixed -> the embedding group is not pruned
            ignored += [blk.mlp.fc2 for blk in model.blocks]
        return [Unit("", model, ignored, {a.qkv: a.num_heads for _, a in self._attns(model)})]

    def check_ratio(self, model: nn.Module, spec: PruningSpec, ratio: float) -> None:
        if spec.global_pruning or spec.isomorphic or ratio == 0:
            return
        if spec.prune_heads:
            hr = ratio if spec.head_ratio is None else spec.head_ratio
            for name, a in self._attns(model):
                if math.ceil(hr * a.num_heads) >= a.num_heads:
                    raise ValueError(
                        f"head ratio {hr} would remove all {a.num_heads} heads of {name}; "
                        f"accepted: a head ratio below {1 - 1 / a.num_heads:.4g}."
                    )
        widths = []
        if not spec.bottleneck:
            widths.append(("embedding", model.embed_dim, None))
        for i, blk in enumerate(model.blocks):
            widths.append((f"blocks.{i}.mlp.fc1", blk.mlp.fc1.out_features, None))
            if not spec.prune_heads:
                a = blk.attn
                widths.append(
                    (f"blocks.{i}.attn (head_dim, {a.num_heads} heads)", a.head_dim, a.num_heads * a.head_dim)
                )
        for what, width, total in widths:
            if kept_channels(width, ratio, spec.round_to, total) < 1:
                raise ValueError(
                    f"ratio={ratio} with round_to={spec.round_to} would remove every channel of "
                    f"{what} (width {width}); accepted: a smaller ratio or round_to (the head "
                    "count and at least one channel per head must be kept)."
                )

    def min_width(self, model: nn.Module, spec: PruningSpec) -> int:
        widths = [blk.mlp.fc1.out_features for blk in model.blocks]
        widths += [a.num_heads if spec.prune_heads else a.head_dim for _, a in self._attns(model)]
        if not spec.bottleneck:
            widths.append(model.embed_dim)
        return min(widths)

    def capture(self, model: nn.Module, units: list[Unit], spec: PruningSpec, before: dict) -> dict:
        heads = units[0].num_heads  # torch-pruning updates this dict when it removes heads
        out = {}
        for name, a in self._attns(model):
            nh = int(heads[a.qkv])
            out[name] = {"num_heads": nh, "head_dim": a.qkv.out_features // (3 * nh), "scale": float(a.scale)}
        return {"attention": out}

    def finalize(self, model: nn.Module, extra: dict) -> None:
        info = extra.get("attention", {})
        attns = dict(self._attns(model))
        if set(info) != set(attns):
            raise ValueError(
                f"structure attention modules {sorted(info)[:4]}... do not match the model's {sorted(attns)[:4]}..."
            )
        for name, d in info.items():
            a = attns[name]
            nh, hd, trained_scale = int(d["num_heads"]), int(d["head_dim"]), float(d["scale"])
            if a.qkv.out_features != 3 * nh * hd or a.proj.in_features != nh * hd:
                raise ValueError(f"{name}: pruned qkv/proj widths do not match num_heads={nh}, head_dim={hd}")
            a.num_heads, a.head_dim, a.attn_dim = nh, hd, nh * hd
            a.scale = hd**-0.5
            # Keep the trained function for both eager (q * scale) and SDPA (default scale from head_dim):
            # q' = q * trained_scale / new_scale, computed once here, identical on every replay.
            factor = trained_scale / a.scale
            if factor != 1.0:
                scale_rows(a.qkv.weight.data, nh * hd, factor)
                if a.qkv.bias is not None:
                    scale_rows(a.qkv.bias.data, nh * hd, factor)


class ViTBlocksFamily(BlockFamily):
    """``VisionTransformer`` variants with block parts the whole-model trace cannot prune (see the module doc)."""

    name = "vit_blocks"
    description = (
        "timm VisionTransformer with qk-norm, scale-norm, gated attention or MLPs, attention pooling "
        "(MLP hidden, head dims or heads; embedding width kept)"
    )
    model_type = VisionTransformer
    blocks = (*MLPS, *ATTENTION)

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer) and whole_model_issue(model) is not None
