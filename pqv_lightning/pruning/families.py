"""Per-family knowledge: what may be pruned, torch-pruning settings, and the attributes to fix afterwards."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Attention, LayerScale, Mlp
from timm.models import efficientvit_mit, efficientvit_msra
from timm.models.vision_transformer import Block, VisionTransformer

from .spec import PruningSpec, UnsupportedModelError
from .structure import scale_rows


@dataclass
class Unit:
    """A sub-network pruned by one torch-pruning pruner (the whole model for ViTs)."""

    prefix: str
    module: nn.Module
    ignored: list[nn.Module]
    num_heads: dict[nn.Module, int]


class Family:
    name = ""
    description = ""
    supports_global = True

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module, spec: PruningSpec | None) -> None:
        """Raise UnsupportedModelError for configurations this family cannot prune correctly."""
        if spec is not None and spec.global_pruning and not self.supports_global:
            raise UnsupportedModelError(
                f"global_pruning=True is not supported for {self.name} "
                "(its prunable units are pruned one by one); use global_pruning=False."
            )

    def heads(self, model: nn.Module) -> list[nn.Module]:
        head = model.get_classifier()
        return [m for m in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(m, nn.Module)]

    def units(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Unit]:
        raise NotImplementedError

    def check_ratio(self, model: nn.Module, spec: PruningSpec, ratio: float) -> None:
        """Raise ValueError if `ratio` with `spec.round_to` would remove a whole dimension."""

    def min_width(self, model: nn.Module, spec: PruningSpec) -> int:
        raise NotImplementedError

    def capture(self, model: nn.Module, units: list[Unit]) -> dict:
        """Plain data about derived attributes, read right after torch-pruning's surgery."""
        return {}

    def finalize(self, model: nn.Module, extra: dict) -> None:
        """Set derived attributes (and fold scales) from `capture`'s data; used by prune and replay."""


def _kept(width: int, ratio: float, round_to: int | None, total: int | None = None) -> int:
    """Channels torch-pruning keeps in a local-pruning group (its rounding is against `total`)."""
    n_pruned = width - int(width * (1 - ratio))
    if round_to and n_pruned > 0:
        current = total or width
        rounded = current - n_pruned
        rounded -= rounded % round_to
        n_pruned = max(current - rounded, 0)
    return width - n_pruned


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
            if _kept(width, ratio, spec.round_to, total) < 1:
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


class ExpansionFamily(Family):
    """Convolutional hybrids: only the hidden (expansion) width of each FFN / MBConv block is pruned.

    The residual stream and attention widths are kept, so every attention-specific attribute stays valid;
    each block is traced on its own (small graphs, no cascaded/linear-attention tracing).
    """

    supports_global = False
    unit_types: tuple[type, ...] = ()
    model_type: type = nn.Module

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_type)

    def check(self, model: nn.Module, spec: PruningSpec | None) -> None:
        super().check(model, spec)
        if spec is not None and spec.prune_heads:
            raise UnsupportedModelError(
                f"prune_heads=True is not supported for {self.name} (only FFN "
                "expansions are pruned); use prune_heads=False."
            )
        if not self._units(model):
            raise UnsupportedModelError(f"{self.name}: no prunable FFN/MBConv expansion found.")

    def _units(self, model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, int]]:
        """(name, block, output layer, hidden width) for each expansion block."""
        raise NotImplementedError

    def units(self, model: nn.Module, spec: PruningSpec, ignored: list[nn.Module]) -> list[Unit]:
        out = []
        for name, block, out_layer, _ in self._units(model):
            if any(m in ignored for m in block.modules()):
                continue
            out.append(Unit(name + ".", block, [out_layer], {}))
        return out

    def check_ratio(self, model: nn.Module, spec: PruningSpec, ratio: float) -> None:
        for name, _, _, width in self._units(model):
            if ratio > 0 and _kept(width, ratio, spec.round_to) < 1:
                raise ValueError(
                    f"ratio={ratio} with round_to={spec.round_to} would remove every hidden "
                    f"channel of {name} (width {width}); accepted: a smaller ratio or round_to."
                )

    def min_width(self, model: nn.Module, spec: PruningSpec) -> int:
        return min(w for *_, w in self._units(model))


class EfficientViTMITFamily(ExpansionFamily):
    name = "efficientvit_mit"
    description = "timm EfficientVit (MIT): efficientvit_b* (MBConv expansions only)"
    model_type = efficientvit_mit.EfficientVit

    def _units(self, model):
        out = []
        for name, m in model.named_modules():
            if isinstance(m, efficientvit_mit.MBConv):
                if m.depth_conv.conv.groups != m.depth_conv.conv.in_channels:
                    continue
                out.append((name, m, m.point_conv, m.inverted_conv.conv.out_channels))
        return out


class EfficientViTMSRAFamily(ExpansionFamily):
    name = "efficientvit_msra"
    description = "timm EfficientVitMsra (Microsoft): efficientvit_m* (ConvMlp expansions only)"
    model_type = efficientvit_msra.EfficientVitMsra

    def _units(self, model):
        return [
            (name, m, m.pw2, m.pw1.conv.out_channels)
            for name, m in model.named_modules()
            if isinstance(m, efficientvit_msra.ConvMlp)
        ]


FAMILIES: tuple[Family, ...] = (ViTFamily(), EfficientViTMITFamily(), EfficientViTMSRAFamily())


def family_of(model: nn.Module) -> Family:
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise UnsupportedModelError(
        f"model type {type(model).__module__}.{type(model).__name__} is not supported for structured "
        "pruning; supported families: " + "; ".join(f.description for f in FAMILIES) + "."
    )


def family_by_name(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ValueError(f"unknown family {name!r}; known: {[f.name for f in FAMILIES]}")


@torch.no_grad()
def unit_inputs(model: nn.Module, units: list[Unit], example_inputs: torch.Tensor) -> list[torch.Tensor]:
    """The input each unit sees on `example_inputs` (first sample only), for tracing the unit alone."""
    if len(units) == 1 and units[0].module is model:
        return [example_inputs]
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        u.module.register_forward_pre_hook(lambda _m, args, i=i: seen.setdefault(i, args[0][:1].detach().clone()))
        for i, u in enumerate(units)
    ]
    was_training = model.training
    try:
        model.eval()
        model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(units))]
