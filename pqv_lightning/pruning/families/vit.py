"""timm's plain ``VisionTransformer``: ViT, DeiT (incl. distilled), DeiT III."""

from __future__ import annotations

import math

import torch.nn as nn
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from pqv_lightning.pruning.families.base import Family, Unit, kept_channels
from pqv_lightning.pruning.spec import PruningSpec, UnsupportedModelError
from pqv_lightning.pruning.structure import scale_rows

__all__ = ["ViTFamily"]


class ViTFamily(Family):
    name = "vit"
    description = "timm VisionTransformer: vit_*, deit_* (incl. distilled), deit3_*"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module, spec: PruningSpec | None) -> None:
        super().check(model, spec)
        if getattr(model, "attn_pool", None) is not None:
            raise UnsupportedModelError("ViT with attention pooling (attn_pool) is not supported.")
        for name, m in model.named_modules():
            cls = type(m)
            if "Attention" in cls.__name__ and cls is not Attention:
                raise UnsupportedModelError(
                    f"{name}: attention type {cls.__module__}.{cls.__name__} is not "
                    "supported; supported: timm.layers.Attention."
                )
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
                    raise UnsupportedModelError(
                        f"{name}: Attention with {', '.join(bad)} is not supported (the softmax-scale "
                        "correction cannot be folded into the query weights)."
                    )
                if m.qkv.out_features != 3 * m.num_heads * m.head_dim:
                    raise UnsupportedModelError(f"{name}: qkv width does not match num_heads*head_dim.")
        for name, blk in model.blocks.named_children():
            if type(blk) is not Block:
                raise UnsupportedModelError(
                    f"blocks.{name}: block type {type(blk).__name__} is not "
                    "supported; supported: timm.models.vision_transformer.Block."
                )
            if not isinstance(blk.mlp, Mlp) or not isinstance(blk.mlp.norm, nn.Identity):
                raise UnsupportedModelError(
                    f"blocks.{name}: MLP type {type(blk.mlp).__name__} (or an MLP "
                    "with a norm) is not supported; supported: timm.layers.Mlp."
                )
            for ls in (blk.ls1, blk.ls2):
                if not isinstance(ls, (nn.Identity, LayerScale)):
                    raise UnsupportedModelError(f"blocks.{name}: layer scale {type(ls).__name__} is not supported.")

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
        if spec.global_pruning or ratio == 0:
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

    def capture(self, model: nn.Module, units: list[Unit]) -> dict:
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
