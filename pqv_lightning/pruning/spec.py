"""What to prune (`PruningSpec`) and what came out (`PruningResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch_pruning as tp

from pqv_lightning.pruning.importances import (
    GRADIENT_IMPORTANCES,
    HOOKED_IMPORTANCES,
    IMPORTANCES,
    OBDCImportance,
    make_importance,
)
from pqv_lightning.utils.checks import InvalidArgumentError, check_bool, check_int, check_number, invalid

DATA_DRIVEN = GRADIENT_IMPORTANCES + HOOKED_IMPORTANCES
_DATA_DRIVEN_TYPES = (
    tp.importance.GroupTaylorImportance,
    tp.importance.GroupHessianImportance,
    tp.importance.OBDCImportance,
    tp.importance.ActivationImportance,
    OBDCImportance,
)


class UnsupportedModelError(InvalidArgumentError):
    """The model (or the spec on this model) cannot be pruned into a correct network.

    Its message has the one argument-check form (:mod:`pqv_lightning.utils.checks`), built by :func:`unsupported`.
    """


def unsupported(name: str, value: object, accepted: str) -> UnsupportedModelError:
    """The refusal of ``name=value`` for a model (raise it): ``name=value is invalid; accepted: ...``."""
    return UnsupportedModelError(str(invalid(name, value, accepted)))


@dataclass(frozen=True)
class PruningSpec:
    """Structured-pruning settings; `ratio` is torch-pruning's `pruning_ratio`.

    ratio: fraction of channels removed in each prunable group, in [0, 1). Exactly one of `ratio`,
        `target_macs`, `target_params` is set (a budget sets `ratio=None`).
    importance: a name in `IMPORTANCES` ("l1", "l2", "taylor", "hessian", "random", "lamp", "fpgm", "obdc",
        "activation"; see :mod:`pqv_lightning.pruning.importances`) or a `torch_pruning.importance.Importance`.
    global_pruning: rank channels across all groups instead of removing `ratio` of each.
    isomorphic: torch-pruning's isomorphic pruning (Fang et al., ECCV 2024): rank together only the groups of the
        same structure (e.g. all MLP hidden groups, all head-dimension groups), `ratio` overall in each.
    bottleneck: prune only inside attention / MLP, keep the embedding width.
    prune_heads: remove whole heads (`head_ratio` of them, default `ratio`); otherwise shrink head dims.
    ignored_layers: module names whose output channels are left alone (classifier heads always are).
    round_to: remaining channel counts rounded down to a multiple (torch-pruning semantics).
    target_macs / target_params: absolute budgets; the ratio is found by bisection.
    calibration_batches: batches read from the calibration data for "taylor" / "hessian".
    """

    ratio: float | None = 0.25
    importance: str | tp.importance.Importance = "l2"
    global_pruning: bool = False
    isomorphic: bool = False
    bottleneck: bool = False
    prune_heads: bool = False
    ignored_layers: tuple[str, ...] = ()
    round_to: int | None = None
    target_macs: float | None = None
    target_params: float | None = None
    calibration_batches: int = 10
    head_ratio: float | None = None

    def __post_init__(self) -> None:
        budgets = [n for n in ("target_macs", "target_params") if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise ValueError(
                f"Give one budget, not both: target_macs={self.target_macs}, target_params={self.target_params}."
            )
        if self.ratio is not None and budgets:
            raise ValueError(
                f"Give either ratio ({self.ratio}) or a budget ({budgets[0]}), not both; "
                "set ratio=None to prune to a budget."
            )
        if self.ratio is None and not budgets:
            raise ValueError("ratio=None needs a budget: set target_macs or target_params.")
        check_number("ratio", self.ratio, 0, 1, max_open=True, allow_none=True, accepted="a float in [0, 1)")
        for name in budgets:
            check_number(
                name, getattr(self, name), 0, min_open=True, accepted="a positive finite number (absolute count)"
            )
        check_number(
            "head_ratio", self.head_ratio, 0, 1, max_open=True, allow_none=True, accepted="None or a float in [0, 1)"
        )
        check_bool("isomorphic", self.isomorphic)
        accepted = f"{', '.join(IMPORTANCES)} or a torch_pruning.importance.Importance"
        if not isinstance(self.importance, tp.importance.Importance) and self.importance not in IMPORTANCES:
            raise invalid("importance", self.importance, accepted)
        if isinstance(self.ignored_layers, str) or not all(isinstance(n, str) for n in self.ignored_layers):
            raise invalid("ignored_layers", self.ignored_layers, "a tuple of module names")
        object.__setattr__(self, "ignored_layers", tuple(self.ignored_layers))
        check_int("round_to", self.round_to, 1, allow_none=True, accepted="None or a positive int")
        check_int("calibration_batches", self.calibration_batches, 1, accepted="a positive int")

    @property
    def data_driven(self) -> bool:
        """True when the importance reads gradients or activations (needs calibration batches)."""
        imp = self.importance
        if isinstance(imp, str):
            return imp in DATA_DRIVEN
        return isinstance(imp, _DATA_DRIVEN_TYPES)

    @property
    def hessian(self) -> bool:
        imp = self.importance
        return imp == "hessian" or isinstance(imp, tp.importance.GroupHessianImportance)

    def make_importance(self) -> tp.importance.Importance:
        """The torch-pruning importance object (the same criteria as torch-pruning's ViT example)."""
        imp = self.importance
        return make_importance(imp) if isinstance(imp, str) else imp

    def to_dict(self) -> dict:
        """Plain-data view (an importance object is stored by its class name)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "importance" and not isinstance(v, str):
                v = type(v).__name__
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


@dataclass
class PruningResult:
    """What `prune` did. `structure` is plain data (JSON and `torch.load(weights_only=True)` safe).

    layer_widths: module name -> (output width before, after) for every layer whose output width changed.
    """

    structure: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layer_widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    ratio: float | None = None

    @property
    def params_reduction(self) -> float:
        return 1 - self.params_after / self.params_before

    @property
    def macs_reduction(self) -> float:
        return 1 - self.macs_after / self.macs_before
