"""Token reduction for timm vision transformers: ToMe's token merging and EViT's token pruning, plain PyTorch.

A vision transformer spends its compute on every token in every block; merging (ToMe, Bolya et al., ICLR 2023)
or pruning (EViT, Liang et al., ICLR 2022) ``r`` tokens a block removes work that channel pruning cannot,
orthogonally to it::

    from pqv_lightning.tokens import TokenReduction, apply_token_reduction, tokens_per_block

    apply_token_reduction(model, TokenReduction("merge", r=13))   # in place; state_dict keys unchanged
    tokens_per_block(model)                                        # [197, 184, ..., 41]

One concept a module: :mod:`~pqv_lightning.tokens.spec` (the settings), :mod:`~pqv_lightning.tokens.matching`
(bipartite soft matching, size-weighted merge), :mod:`~pqv_lightning.tokens.pruning` (EViT's fusion),
:mod:`~pqv_lightning.tokens.slots` (the same reduction as one matrix product: the form an XNNPACK delegate runs),
:mod:`~pqv_lightning.tokens.blocks` (attention with metric and proportional attention, the reducing block),
:mod:`~pqv_lightning.tokens.models` (the reduced model classes and their pooling), :mod:`~pqv_lightning.tokens.apply`
(apply, remove, read back, count, refuse).
"""

from pqv_lightning.tokens.apply import (
    SUPPORTED,
    apply_token_reduction,
    check_token_reduction,
    is_token_reduced,
    reduction_form_of,
    remove_token_reduction,
    set_reduction_form,
    token_reduction_of,
    token_summary,
    tokens_per_block,
)
from pqv_lightning.tokens.blocks import TokenAttention, register_token_attention
from pqv_lightning.tokens.matching import Matching, bipartite_soft_matching, merge_wavg
from pqv_lightning.tokens.models import (
    REDUCED_CLASSES,
    ReducedCait,
    ReducedVisionTransformer,
    ReducedVisionTransformerDistilled,
)
from pqv_lightning.tokens.pruning import fuse_inattentive
from pqv_lightning.tokens.slots import merge_slots, prune_slots, reduce_by_slots
from pqv_lightning.tokens.spec import FORMS, METHODS, SCHEDULES, TokenReduction, capped_r

__all__ = [
    "FORMS",
    "METHODS",
    "REDUCED_CLASSES",
    "SCHEDULES",
    "SUPPORTED",
    "Matching",
    "ReducedCait",
    "ReducedVisionTransformer",
    "ReducedVisionTransformerDistilled",
    "TokenAttention",
    "TokenReduction",
    "apply_token_reduction",
    "bipartite_soft_matching",
    "capped_r",
    "check_token_reduction",
    "fuse_inattentive",
    "is_token_reduced",
    "merge_slots",
    "merge_wavg",
    "prune_slots",
    "reduce_by_slots",
    "reduction_form_of",
    "register_token_attention",
    "remove_token_reduction",
    "set_reduction_form",
    "token_reduction_of",
    "token_summary",
    "tokens_per_block",
]
