"""The model families the pruning engine knows, one module each, registered by name.

A family handler (:class:`~pqv_lightning.pruning.families.base.Family`) says which models it matches, what it
may prune and how, and which derived attributes it fixes afterwards, so that a pruned network computes a correct
function and its structure replays without tracing. A model no family matches is refused by name.
"""

from __future__ import annotations

import torch.nn as nn

from pqv_lightning.pruning.families.base import Block, BlockFamily, Family, Unit, kept_channels, unit_inputs
from pqv_lightning.pruning.families.beit import BEiTFamily
from pqv_lightning.pruning.families.cait import CaiTFamily
from pqv_lightning.pruning.families.convit import ConViTFamily
from pqv_lightning.pruning.families.edgenext import EdgeNeXtFamily
from pqv_lightning.pruning.families.efficientformer import EfficientFormerFamily, EfficientFormerV2Family
from pqv_lightning.pruning.families.efficientvit import EfficientViTMITFamily, EfficientViTMSRAFamily
from pqv_lightning.pruning.families.eva import EVAFamily
from pqv_lightning.pruning.families.fastvit import FastViTFamily
from pqv_lightning.pruning.families.levit import LeViTFamily
from pqv_lightning.pruning.families.mobilevit import MobileViTFamily, MobileViTV2Family
from pqv_lightning.pruning.families.pit import PiTFamily
from pqv_lightning.pruning.families.pvt_v2 import PVTv2Family
from pqv_lightning.pruning.families.swin import SwinFamily, SwinV2Family
from pqv_lightning.pruning.families.tiny_vit import TinyViTFamily
from pqv_lightning.pruning.families.vit import ViTBlocksFamily, ViTFamily
from pqv_lightning.pruning.families.xcit import XCiTFamily
from pqv_lightning.pruning.spec import unsupported
from pqv_lightning.utils.checks import invalid

__all__ = [
    "FAMILIES",
    "REFUSED",
    "REFUSED_EXAMPLES",
    "Block",
    "BlockFamily",
    "Family",
    "Unit",
    "family_by_name",
    "family_of",
    "kept_channels",
    "register_family",
    "unit_inputs",
]

#: The registered families, in matching order (the first that matches a model handles it).
FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add a family handler (its ``name`` must be new); returns it, so a module can register at import."""
    if not isinstance(family, Family) or not family.name:
        raise invalid("family", family, "a Family instance with a name")
    if any(f.name == family.name for f in FAMILIES):
        raise invalid("family", family.name, f"a new name (registered: {', '.join(f.name for f in FAMILIES)})")
    FAMILIES.append(family)
    return family


for _family in (
    ViTFamily(),
    ViTBlocksFamily(),
    EfficientViTMITFamily(),
    EfficientViTMSRAFamily(),
    MobileViTFamily(),
    MobileViTV2Family(),
    LeViTFamily(),
    EfficientFormerFamily(),
    EfficientFormerV2Family(),
    TinyViTFamily(),
    SwinFamily(),
    SwinV2Family(),
    PVTv2Family(),
    EdgeNeXtFamily(),
    FastViTFamily(),
    EVAFamily(),
    BEiTFamily(),
    CaiTFamily(),
    XCiTFamily(),
    PiTFamily(),
    ConViTFamily(),
):
    register_family(_family)


#: timm transformer families without a handler, by model class, and what in them no handler covers.
REFUSED: dict[str, str] = {
    "timm.models.crossvit.CrossVit": "two branches of different widths exchange their class tokens through "
    "cross-attention and projections between the widths",
    "timm.models.mvitv2.MultiScaleVit": "pooling attention: q/k/v pooling convolutions on the head dims, "
    "residual pooling and width changes inside the attention",
    "timm.models.twins.Twins": "locally-grouped and global sub-sampled attention with position-encoding convolutions",
    "timm.models.maxxvit.MaxxVit": "block and grid partition attention with relative-position MLPs, MBConv with SE",
    "timm.models.hiera.Hiera": "mask-unit attention whose query pooling changes widths inside the attention",
    "timm.models.coat.CoaT": "factorised attention with convolutional relative position encodings shared by "
    "serial and parallel blocks",
    "timm.models.nest.Nest": "nested transformer blocks aggregated by convolution pooling",
    "timm.models.volo.VOLO": "outlooker attention (attention weights from a linear layer over unfolded windows)",
    "timm.models.gcvit.GlobalContextVit": "global query tokens generated per stage and shared by window attentions",
    "timm.models.davit.DaVit": "dual spatial-window and channel-group attention",
}

#: The smallest timm model of each family in ``REFUSED`` (what the tests and ``benchmarks/zoo.py`` offer the engine).
REFUSED_EXAMPLES: tuple[str, ...] = (
    "crossvit_tiny_240",
    "mvitv2_tiny",
    "twins_svt_small",
    "maxvit_tiny_tf_224",
    "hiera_tiny_224",
    "coat_lite_tiny",
    "nest_tiny",
    "volo_d1_224",
    "gcvit_xxtiny",
    "davit_tiny",
)


def family_of(model: nn.Module) -> Family:
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    kind = f"{type(model).__module__}.{type(model).__name__}"
    why = f"unsupported: {REFUSED[kind]}" if kind in REFUSED else "no family handler matches this model type"
    raise unsupported(
        "model",
        kind,
        f"a model of a supported family for structured pruning ({why}). Supported families: "
        + "; ".join(f.description for f in FAMILIES),
    )


def family_by_name(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise invalid("family", name, ", ".join(f.name for f in FAMILIES))
