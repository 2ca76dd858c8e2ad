"""Pruning to a measured latency: the smallest pruning ratio whose exported file runs within a target on this CPU.

MACs are a poor proxy for the time a file takes (the same MACs run at very different speeds in different runtimes
and widths), so the ratio is searched by doing what the deployment will do: prune a copy at a candidate ratio,
export it to the chosen artifact kind (``"<format>-<precision>"`` such as ``"onnx-int8"``, or ``"eager"``),
load it in its own runtime in a fresh process at ``threads`` threads (as it will run: a training process's thread
pools slow a small model timed beside them) and take the median of ``runs`` calls after ``warmup``. Bisection on the
ratio, every measured ratio cached, so the callback that resumes or a sweep that asks again does not re-measure.
Widths, and so latency, do not depend on which channels go: the trials rank channels by magnitude (no data needed)
and the real pruning later uses its own criterion at the ratio found. Lightning-free;
:class:`pqv_lightning.callbacks.StructuredPruning` uses it with ``target_latency_ms``.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pqv_lightning.export.formats import list_formats
from pqv_lightning.pruning import PruningSpec, largest_ratio, prune
from pqv_lightning.tokens import TokenReduction, apply_token_reduction, check_token_reduction, tokens_per_block
from pqv_lightning.utils.checks import check_choice, check_int, check_number, invalid
from pqv_lightning.utils.modules import cpu_float_copy
from pqv_lightning.utils.progress import Progress

__all__ = [
    "LATENCY_ARTIFACTS",
    "LatencySearch",
    "LatencyTarget",
    "TokenSearch",
    "largest_r",
    "latency_artifacts",
    "measure_model_latency",
    "measure_pruned_latency",
    "search_ratio",
    "search_tokens",
    "trials_of",
]

log = logging.getLogger(__name__)


#: What a latency target can be measured on: the eager model, or a file of ``<format>-<precision>``.
def latency_artifacts() -> tuple[str, ...]:
    """What a latency target can be measured on now: the eager model, or ``<format>-<precision>`` of any
    registered format's precisions made from the float model alone."""
    return ("eager", *(f"{f.name}-{p}" for f in list_formats() for p in f.latency_precisions))


LATENCY_ARTIFACTS = latency_artifacts()
_SEARCH_STEPS = 6  # bisection steps after the two ends: the ratio to within 1/64 of its range
_RATIO_DIGITS = 4  # measured ratios are cached rounded down to this many digits
# A trial this much slower than a less pruned one is measured again (the faster of the two counts): measured on
# deit_small, ratio 0.3999 read 18.2 ms between 13.3 ms at 0.3691 and 11.2 ms at 0.4152, and 11.1 ms side by side.
_SLOWER_BY = 0.05


@dataclass(frozen=True)
class LatencyTarget:
    """A latency to prune to: ``target_ms`` for one call of ``artifact`` at the example input's batch, with the
    runtime at ``threads`` threads: after ``warmup`` calls, ``runs`` calls in ``rounds`` batches (at most ``runs``),
    the median of the quietest batch (one slow spell of a shared machine does not misdirect the bisection)."""

    target_ms: float
    artifact: str = "onnx-int8"
    threads: int = 1
    warmup: int = 5
    runs: int = 30
    rounds: int = 3

    def __post_init__(self) -> None:
        check_number("target_latency_ms", self.target_ms, 0, min_open=True, accepted="a positive number of ms")
        check_choice("latency_target", self.artifact, latency_artifacts())
        check_int("threads", self.threads, 1)
        check_int("warmup", self.warmup, 0)
        check_int("runs", self.runs, 1)
        check_int("rounds", self.rounds, 1)

    @property
    def format(self) -> str:
        return self.artifact.split("-", 1)[0]

    @property
    def precision(self) -> str:
        return self.artifact.split("-", 1)[1] if "-" in self.artifact else "fp32"

    def describe(self) -> str:
        return f"{self.artifact} at {self.threads} thread{'s' * (self.threads != 1)}"


class _StoredSearch:
    """Plain data for a search's outcome whose first field is its knob (``ratio``, ``r``; of type ``knob_type``),
    then ``latency_ms``, ``target`` and ``trials`` (knob -> ms): what checkpoints keep and rank 0 broadcasts."""

    knob_type: ClassVar[type] = float

    def as_dict(self) -> dict:
        """Plain data (JSON and checkpoint safe): the target, the choice, the trials as ``[knob, ms]`` pairs."""
        knob = fields(self)[0].name
        return {
            **asdict(self.target),
            knob: getattr(self, knob),
            "latency_ms": self.latency_ms,
            "trials": [[k, ms] for k, ms in sorted(self.trials.items())],
        }

    @classmethod
    def from_dict(cls, doc: dict):
        """The search :meth:`as_dict` wrote (a checkpoint's state, a rank-0 broadcast)."""
        knob, cast = fields(cls)[0].name, cls.knob_type
        # a key missing from an older checkpoint's search takes its default
        target = LatencyTarget(**{f.name: doc[f.name] for f in fields(LatencyTarget) if f.name in doc})
        return cls(cast(doc[knob]), doc["latency_ms"], target, {cast(k): float(ms) for k, ms in doc["trials"]})


@dataclass
class LatencySearch(_StoredSearch):
    """The outcome: the ``ratio`` chosen, its measured ``latency_ms``, and every trial (ratio -> ms)."""

    ratio: float
    latency_ms: float
    target: LatencyTarget
    trials: dict[float, float] = field(default_factory=dict)


def trials_of(pairs: Sequence[Sequence[float]]) -> dict[float, float]:
    """``[[ratio, ms], ...]`` (as stored in JSON) as the ``{ratio: ms}`` cache :func:`search_ratio` takes."""
    return {float(r): float(ms) for r, ms in pairs}


def measure_pruned_latency(
    model: nn.Module,
    spec: PruningSpec,
    ratio: float,
    example_input: Tensor,
    target: LatencyTarget,
    calibration: Sequence[Tensor] | None = None,
    tokens: TokenReduction | None = None,
) -> float:
    """Median latency (ms) of ``model`` pruned by ``ratio`` (a copy; magnitude ranking) as ``target.artifact``;
    with ``tokens``, the pruned copy also reduces tokens so (the latency a fit with both will ship)."""
    x = example_input.detach().float().cpu().contiguous()
    clone = cpu_float_copy(model)
    if ratio > 0:
        prune(clone, replace(spec, ratio=ratio, importance="l2", target_macs=None, target_params=None), x)
        clone.eval()
    if tokens is not None:
        apply_token_reduction(clone, tokens)
    return measure_model_latency(clone, x, target, calibration, f"the model pruned by {ratio:.4g}")


def measure_model_latency(
    model: nn.Module,
    example_input: Tensor,
    target: LatencyTarget,
    calibration: Sequence[Tensor] | None = None,
    what: str = "the model",
) -> float:
    """Median latency (ms) of ``model`` (a CPU float copy in eval mode, used as it is) as ``target.artifact``:
    eager in this process, or exported and timed in a fresh process of its own runtime."""
    from pqv_lightning.export import export_artifacts
    from pqv_lightning.measure import fresh_process_latency, make_runner, measure_latency

    x = example_input
    previous = torch.get_num_threads()
    try:
        if target.artifact == "eager":
            return measure_latency(make_runner(model, "eager", x, target.threads), target.warmup, target.runs).median_ms
        fmt, precision = target.format, target.precision
        with torch.no_grad():
            labels = model(x).argmax(1)
        with tempfile.TemporaryDirectory(prefix="pqv-latency-") as work:
            records = export_artifacts(
                model, work, {fmt: [precision]}, x, [(x, labels)], calibration=list(calibration or [x])
            )
            (record,) = [r for r in records if r.name == target.artifact]
            if record.path is None:
                raise RuntimeError(f"{target.artifact} of {what} failed: {record.reason}")
            stats = fresh_process_latency(
                record.path,
                fmt,
                list(x.shape),
                target.threads,
                target.warmup,
                target.runs,
                record.engine,
                rounds=min(target.rounds, target.runs),
            )
            return stats.median_ms
    finally:
        torch.set_num_threads(previous)  # timing fixed the process's threads; training goes on with its own


class _Trials:
    """The measured latency of each setting of one knob (the pruning ratio, or tokens removed per block ``r``):
    measured once and cached; a trial more than 5% slower than a smaller setting is measured once more and the faster
    reading kept (more pruning or merging is never slower; noise only ever slows a reading down)."""

    def __init__(
        self,
        knob: str,
        measure: Callable[[Any], float],
        key_of: Callable[[Any], Any],
        target: LatencyTarget,
        cache: dict,
        progress: Progress,
    ) -> None:
        self.knob, self.measure, self.key_of, self.target = knob, measure, key_of, target
        self.cache, self.progress = cache, progress

    def __call__(self, value: Any) -> float:
        key = self.key_of(value)
        if key not in self.cache:
            self.cache[key] = float(self.measure(key))
            log.info("latency search: %s %.4g -> %.3f ms (%s)", self.knob, key, self.cache[key], self.target.describe())
            self.progress.step(
                f"{self.knob} {key:.4g}", f"{self.cache[key]:.3f} ms (target {self.target.target_ms:g} ms)"
            )
            faster = [k for k, t in self.cache.items() if k < key and t < self.cache[key] * (1 - _SLOWER_BY)]
            if faster:  # a smaller setting ran faster: a slow spell of the machine, not the model
                again = float(self.measure(key))
                log.info(
                    "latency search: %s %.4g slower than the smaller %.4g (%.3f ms); again: %.3f ms",
                    self.knob,
                    key,
                    faster[0],
                    self.cache[faster[0]],
                    again,
                )
                self.cache[key] = min(self.cache[key], again)
        return self.cache[key]


def search_ratio(
    model: nn.Module,
    spec: PruningSpec,
    example_input: Tensor,
    target: LatencyTarget,
    calibration: Sequence[Tensor] | None = None,
    trials: dict[float, float] | None = None,
    measure: Callable[[float], float] | None = None,
    progress: Progress | None = None,
    tokens: TokenReduction | None = None,
) -> LatencySearch:
    """The smallest ratio (to within 1/64 of the prunable range) whose pruned file runs within ``target``.

    With ``tokens`` the trial copies also reduce tokens so: the ratio does what the fixed token reduction leaves.

    ``trials`` (ratio -> ms) are measurements already made (a cache; updated in place); a trial more than 5% slower
    than a less pruned one is measured once more and the faster reading kept (more pruning is never slower; noise
    only ever slows a reading down). ``measure(ratio)`` replaces :func:`measure_pruned_latency` (e.g. a fake in
    tests). ``progress`` shows each trial as it is measured (cached trials are not measured again). Raises
    ``ValueError`` naming the latency the most-pruned model reaches when the target is below it: before any
    training, not after.
    """
    progress = progress or Progress.silent()
    if not isinstance(target, LatencyTarget):
        raise invalid("target", type(target).__name__, "a LatencyTarget")
    cache = trials if trials is not None else {}
    measure = measure or (lambda r: measure_pruned_latency(model, spec, r, example_input, target, calibration, tokens))

    def key_of(ratio: float) -> float:
        # rounded down: the largest ratio keeps one channel of its narrowest group only if not rounded up
        return math.floor(ratio * 10**_RATIO_DIGITS) / 10**_RATIO_DIGITS

    ms = _Trials("ratio", measure, key_of, target, cache, progress)

    def found(ratio: float) -> LatencySearch:
        return LatencySearch(key_of(ratio), ms(ratio), target, dict(cache))

    with progress.stage(f"latency search ({target.describe()})", 2 + _SEARCH_STEPS):
        return _bisect(model, spec, target, ms, found)


def _bisect(
    model: nn.Module,
    spec: PruningSpec,
    target: LatencyTarget,
    ms: Callable[[float], float],
    found: Callable[[float], LatencySearch],
) -> LatencySearch:
    """The bisection of :func:`search_ratio` on ``ms(ratio)``."""
    if ms(0.0) <= target.target_ms:
        return found(0.0)
    hi = largest_ratio(model, spec)
    if hi <= 0 or ms(hi) > target.target_ms:
        reached = ms(hi) if hi > 0 else ms(0.0)
        raise ValueError(
            f"target_latency_ms={target.target_ms:g} is unreachable for {target.describe()} on this CPU: the most "
            f"this model can be pruned (ratio {hi:.4g}) runs in {reached:.3g} ms (unpruned: {ms(0.0):.3g} ms); "
            f"accepted: a target >= {reached:.3g} ms."
        )
    lo = 0.0
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        if ms(mid) <= target.target_ms:
            hi = mid
        else:
            lo = mid
    return found(hi)


@dataclass
class TokenSearch(_StoredSearch):
    """The outcome of :func:`search_tokens`: the ``r`` chosen, its measured ``latency_ms``, every trial (r -> ms)."""

    knob_type: ClassVar[type] = int

    r: int
    latency_ms: float
    target: LatencyTarget
    trials: dict[int, float] = field(default_factory=dict)


def largest_r(model: nn.Module) -> int:
    """The ``r`` past which a reduction removes nothing more: what the first block removes at any larger ``r`` (half
    its reducible tokens, ToMe's cap)."""
    probe = apply_token_reduction(copy.deepcopy(model), TokenReduction("merge", r=2**20))
    counts = tokens_per_block(probe)
    return counts[0] - counts[1]


def search_tokens(
    model: nn.Module,
    reduction: TokenReduction,
    example_input: Tensor,
    target: LatencyTarget,
    calibration: Sequence[Tensor] | None = None,
    trials: dict[int, float] | None = None,
    measure: Callable[[int], float] | None = None,
    progress: Progress | None = None,
    pruning: tuple[PruningSpec, float] | None = None,
) -> TokenSearch:
    """The smallest ``r`` (tokens removed per block, with ``reduction``'s method and schedule) whose file runs within
    ``target``: bisection on the integers from 0 to :func:`largest_r`, each trial a copy of ``model`` reducing tokens
    at that ``r``, exported and timed as :func:`search_ratio` does (the same cache and second-reading rule).

    ``pruning=(spec, ratio)`` prunes each trial copy first (a fit that also prunes at a fixed ratio: the tokens do
    what the channels leave). Raises ``ValueError`` naming what the largest ``r`` reaches when the target is below it.
    """
    progress = progress or Progress.silent()
    if not isinstance(target, LatencyTarget):
        raise invalid("target", type(target).__name__, "a LatencyTarget")
    check_token_reduction(model, reduction)
    cache = trials if trials is not None else {}

    def measured(r: int) -> float:
        x = example_input.detach().float().cpu().contiguous()
        clone = cpu_float_copy(model)
        if pruning is not None and pruning[1] > 0:
            prune(
                clone, replace(pruning[0], ratio=pruning[1], importance="l2", target_macs=None, target_params=None), x
            )
            clone.eval()
        apply_token_reduction(clone, replace(reduction, r=int(r)))
        return measure_model_latency(clone, x, target, calibration, f"the model reducing {r} tokens a block")

    ms = _Trials("r", measure or measured, int, target, cache, progress)
    hi = largest_r(model)
    with progress.stage(f"token search ({target.describe()})", 2 + max(1, hi).bit_length()):
        if ms(0) <= target.target_ms:
            return TokenSearch(0, ms(0), target, dict(cache))
        if hi == 0 or ms(hi) > target.target_ms:
            reached = ms(hi)
            raise ValueError(
                f"target_latency_ms={target.target_ms:g} is unreachable for {target.describe()} on this CPU by "
                f"reducing tokens: r={hi} (the most that removes anything) runs in {reached:.3g} ms (r=0: "
                f"{ms(0):.3g} ms); accepted: a target >= {reached:.3g} ms, or pruning channels as well."
            )
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ms(mid) <= target.target_ms:
                hi = mid
            else:
                lo = mid
        return TokenSearch(hi, ms(hi), target, dict(cache))
