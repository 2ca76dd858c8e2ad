"""What token reduction to apply (:class:`TokenReduction`): the method, ``r`` and its schedule over the blocks.

``r`` has one meaning for both methods: the number of tokens a block removes. ToMe's ``"merge"`` merges ``r``
pairs of similar tokens; EViT's ``"prune"`` keeps the patch tokens the class token attends to most and fuses the
``r + 1`` others into one token. Either way a block leaves ``r`` fewer tokens than it received. A block never
removes more than half of its reducible tokens (ToMe's cap, applied to both methods, see :func:`capped_r`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pqv_lightning.utils.checks import check_bool, check_choice, check_int, invalid

__all__ = ["FORMS", "METHODS", "SCHEDULES", "TokenReduction", "capped_r"]

#: ``"merge"``: ToMe's bipartite soft matching; ``"prune"``: EViT's inattentive-token fusion.
METHODS = ("merge", "prune")
#: Named schedules; an explicit list of ints (one per block) is the third form.
SCHEDULES = ("constant", "decreasing")
#: How a block moves its tokens (the same function): ``"gather"`` by index (training, most runtimes), ``"matrix"``
#: by one matrix product (:mod:`pqv_lightning.tokens.slots`: what an XNNPACK delegate can run).
FORMS = ("gather", "matrix")


def capped_r(r: int, reducible: int) -> int:
    """The tokens a block removes out of ``reducible`` (patch tokens, prefix tokens excluded): at most half of
    them (ToMe's rule: bipartite matching pairs each merged token with one of the other half)."""
    return max(0, min(r, reducible // 2))


@dataclass(frozen=True)
class TokenReduction:
    """Token reduction settings (plain data: :meth:`as_dict` / :meth:`from_dict` for checkpoints).

    method: ``"merge"`` (ToMe, Bolya et al. 2023) or ``"prune"`` (EViT, Liang et al. 2022).
    r: tokens removed per block (before the schedule), an int >= 0; 0 leaves the model's function unchanged.
    schedule: ``"constant"`` (``r`` in every block), ``"decreasing"`` (ToMe's: linearly from ``2r`` in the first
        block to 0 in the last, about the same total), or a list of ints, one per reducing block.
    proportional_attention: add ``log(size)`` to the attention logits of every key, so a token that stands for
        ``s`` merged tokens gets the attention those ``s`` tokens would have had. ``None``: on for ``"merge"``
        (ToMe), off for ``"prune"`` (EViT has none).
    """

    method: str = "merge"
    r: int = 8
    schedule: str | tuple[int, ...] = "constant"
    proportional_attention: bool | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_int("r", self.r, 0)
        schedule = self.schedule
        if isinstance(schedule, str):
            check_choice("schedule", schedule, SCHEDULES)
        elif isinstance(schedule, (list, tuple)) and schedule:
            for i, value in enumerate(schedule):
                check_int(f"schedule[{i}]", value, 0)
            object.__setattr__(self, "schedule", tuple(int(v) for v in schedule))
        else:
            raise invalid("schedule", schedule, f"{', '.join(SCHEDULES)}, or a non-empty list of ints >= 0 per block")
        if self.proportional_attention is None:
            object.__setattr__(self, "proportional_attention", self.method == "merge")
        check_bool("proportional_attention", self.proportional_attention)

    def per_block(self, depth: int) -> tuple[int, ...]:
        """``r`` of each of ``depth`` reducing blocks (before the per-block cap of :func:`capped_r`).

        An explicit list must have one entry per block (refused otherwise, naming the depth).
        """
        check_int("depth", depth, 1)
        if isinstance(self.schedule, tuple):
            if len(self.schedule) != depth:
                raise invalid(
                    "schedule", list(self.schedule), f"a list of {depth} ints, one per block of this model ({depth})"
                )
            return self.schedule
        if self.schedule == "constant" or depth == 1:
            return (self.r,) * depth
        # ToMe's parse_r with inflection -1: from 2r down to 0 in equal steps, rounded down.
        step = -2 * self.r / (depth - 1)
        return tuple(int(2 * self.r + step * i) for i in range(depth))

    def as_dict(self) -> dict[str, Any]:
        """Plain data (str, int, bool, list) for checkpoints and reports."""
        schedule = list(self.schedule) if isinstance(self.schedule, tuple) else self.schedule
        return {
            "method": self.method,
            "r": self.r,
            "schedule": schedule,
            "proportional_attention": self.proportional_attention,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenReduction:
        """The spec :meth:`as_dict` wrote (unknown keys refused, so a newer file is not silently misread)."""
        if not isinstance(data, dict):
            raise invalid("token_reduction", data, "a dict written by TokenReduction.as_dict()")
        unknown = sorted(set(data) - {"method", "r", "schedule", "proportional_attention"})
        if unknown:
            raise invalid("token_reduction", data, f"a dict without the unknown keys {unknown}")
        return cls(**data)

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"merge r=8 (constant), proportional attention"``."""
        schedule = self.schedule if isinstance(self.schedule, str) else list(self.schedule)
        extra = ", proportional attention" if self.proportional_attention else ""
        return f"{self.method} r={self.r} ({schedule}){extra}"
