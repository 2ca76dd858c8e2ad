"""EfficientViT (MIT ``efficientvit_b*`` and Microsoft ``efficientvit_m*``): the FFN / MBConv expansions."""

from __future__ import annotations

import torch.nn as nn
from timm.models import efficientvit_mit, efficientvit_msra

from pqv_lightning.pruning.families.base import Family, Unit, kept_channels
from pqv_lightning.pruning.spec import PruningSpec, UnsupportedModelError

__all__ = ["EfficientViTMITFamily", "EfficientViTMSRAFamily", "ExpansionFamily"]


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
            if ratio > 0 and kept_channels(width, ratio, spec.round_to) < 1:
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
