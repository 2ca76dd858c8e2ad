"""Mixed precision: which layers stay in float, given by name or chosen from the sensitivity ranking by a budget.

A :class:`MixedPrecision` spec names layers to keep in float (names or globs of layers and blocks) and/or a
budget: ``max_float_layers=k`` keeps the ``k`` most sensitive units in float; ``max_drop=X`` keeps the fewest
units (most sensitive first) that bring the top-1 drop against the float model down to at most ``X`` points,
``max_float_layers`` then capping how many it may take. :func:`plan_float_layers` runs the sensitivity analysis
and measures each candidate on the images it is given: choose on validation data, report on a held-out split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from pqv_lightning.quantization.layers import GRANULARITIES, quantizable_layers, resolve_float_layers, units
from pqv_lightning.quantization.ptq import quantize
from pqv_lightning.quantization.sensitivity import (
    LogitReference,
    SensitivityAnalysis,
    analyze_sensitivity,
    logit_metrics,
)
from pqv_lightning.quantization.targets import QuantizationTarget
from pqv_lightning.utils.checks import InvalidArgumentError, check_choice, check_int, check_number, invalid

__all__ = ["BudgetNotMetError", "MixedPrecision", "MixedPrecisionPlan", "plan_float_layers"]


class BudgetNotMetError(InvalidArgumentError):
    """A float budget that no allowed set of float layers meets (the message says what the best one reached)."""


@dataclass(frozen=True)
class MixedPrecision:
    """Layers to keep in float, by name and/or by budget (see the module docstring).

    Args:
        float_layers: names or ``fnmatch`` globs of layers or blocks kept in float for every target.
        max_float_layers: at most this many units (of ``granularity``) chosen in float by the budget; alone, exactly
            the ``k`` most sensitive.
        max_drop: the largest top-1 drop against the float model, in points, that the budget accepts.
        granularity: ``"layer"`` or ``"block"``: the units the budget counts and the sensitivity ranks.
    """

    float_layers: tuple[str, ...] = ()
    max_float_layers: int | None = None
    max_drop: float | None = None
    granularity: str = "layer"

    def __post_init__(self) -> None:
        layers = self.float_layers
        if isinstance(layers, str):
            layers = (layers,)
        for i, pattern in enumerate(layers):
            if not isinstance(pattern, str) or not pattern.strip():
                raise invalid(f"float_layers[{i}]", pattern, "a layer or block name, or a glob of them")
        object.__setattr__(self, "float_layers", tuple(dict.fromkeys(p.strip() for p in layers)))
        check_int("max_float_layers", self.max_float_layers, 1, allow_none=True)
        check_number("max_drop", self.max_drop, 0, 100, allow_none=True)
        check_choice("granularity", self.granularity, GRANULARITIES)

    @property
    def budgeted(self) -> bool:
        """Whether the float layers are (partly) chosen by a budget from the sensitivity ranking."""
        return self.max_float_layers is not None or self.max_drop is not None

    @property
    def active(self) -> bool:
        return bool(self.float_layers) or self.budgeted

    def check_model(self, model: nn.Module, method: str = "int8_pt2e") -> tuple[str, ...]:
        """The named float layers of ``model`` (raises, listing close names, for a pattern that matches none), and
        a budget that cannot fit the model (more float units than it has)."""
        named = resolve_float_layers(model, self.float_layers, method)
        if self.max_float_layers is not None:
            count = len(units(quantizable_layers(model, method), self.granularity))
            if self.max_float_layers >= count:
                raise invalid(
                    "max_float_layers",
                    self.max_float_layers,
                    f"an int in [1, {count - 1}]: {type(model).__name__} has {count} {self.granularity}s for "
                    f"{method}, and at least one must stay quantized",
                )
        return named

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_layers": list(self.float_layers),
            "max_float_layers": self.max_float_layers,
            "max_drop": self.max_drop,
            "granularity": self.granularity,
        }


@dataclass
class MixedPrecisionPlan:
    """The float layers chosen for one target, and how: ``steps`` are the candidates the budget measured
    (``units`` in float, ``top1``, ``drop`` in points), ``sensitivity`` the analysis it followed."""

    target: QuantizationTarget
    float_layers: tuple[str, ...]
    float_units: list[str] = field(default_factory=list)
    float_top1: float | None = None
    top1: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: SensitivityAnalysis | None = None

    @property
    def drop(self) -> float | None:
        """Top-1 drop against the float model, in points, on the images the plan was measured on."""
        return None if self.top1 is None or self.float_top1 is None else 100 * (self.float_top1 - self.top1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "float_layers": list(self.float_layers),
            "float_units": list(self.float_units),
            "float_top1": self.float_top1,
            "top1": self.top1,
            "drop_points": self.drop,
            "steps": list(self.steps),
        }


def plan_float_layers(
    model: nn.Module,
    target: QuantizationTarget | str,
    spec: MixedPrecision,
    batches: Sequence[tuple[Tensor, Tensor]] | LogitReference,
    calibration: Sequence[Any] | None = None,
    sensitivity: SensitivityAnalysis | None = None,
) -> MixedPrecisionPlan:
    """The float layers of ``spec`` for ``target``: the named ones, plus the budget's choice from the sensitivity
    ranking (computed here unless ``sensitivity`` is given), each candidate measured on ``batches``.

    Raises :class:`BudgetNotMetError` when ``max_drop`` cannot be met within ``max_float_layers`` (or with every
    unit but one in float), naming the best drop reached.
    """
    target = QuantizationTarget.parse(target) if isinstance(target, str) else target
    named = spec.check_model(model, target.method)
    plan = MixedPrecisionPlan(target, named)
    if not spec.budgeted:
        return plan
    reference = batches if isinstance(batches, LogitReference) else LogitReference.of(model, batches)
    if sensitivity is None or sensitivity.granularity != spec.granularity or sensitivity.target != target:
        # the ranking needs what keeping each unit in float recovers: half the work of both measurements
        sensitivity = analyze_sensitivity(model, target, reference, calibration, spec.granularity, ["float_alone"])
    plan.sensitivity, plan.float_top1 = sensitivity, reference.top1
    ranked = [u for u in sensitivity.units if u.error is None and not set(u.layers) <= set(named)]
    limit = len(ranked) - 1 if spec.max_float_layers is None else min(spec.max_float_layers, len(ranked) - 1)
    counts = range(0, limit + 1) if spec.max_drop is not None else [limit]
    example = reference.batches[0][0][:1]
    for count in counts:
        chosen = [u.unit for u in ranked[:count]]
        keep = set(named).union(*(u.layers for u in ranked[:count]))
        layers = tuple(layer for layer in quantizable_layers(model, target.method) if layer in keep)
        variant = quantize(model, target, example, calibration, float_layers=layers)
        top1 = logit_metrics(variant.module, reference)["top1"]
        drop = 100 * (reference.top1 - top1)
        plan.steps.append({"units": chosen, "top1": top1, "drop": drop})
        plan.float_layers, plan.float_units, plan.top1 = layers, chosen, top1
        if spec.max_drop is None or drop <= spec.max_drop + 1e-9:
            return plan
    best = min(plan.steps, key=lambda s: s["drop"])
    cap = f"max_float_layers={spec.max_float_layers}" if spec.max_float_layers is not None else "all but one unit"
    more = "" if spec.max_float_layers is None else " (or allow more float layers)"
    raise BudgetNotMetError(
        invalid(
            "max_drop",
            spec.max_drop,
            f"a drop {target} can reach on this model with {cap} in float: the best was {best['drop']:.2f} points "
            f"with {len(best['units'])} {spec.granularity}(s) in float ({', '.join(best['units']) or 'none'}); "
            f"use max_drop >= {best['drop']:.2f}{more}",
        ).args[0]
    )
