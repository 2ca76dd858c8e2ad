"""Pruning to a measured latency: the smallest pruning ratio whose exported file runs within a target on this CPU.

MACs are a poor proxy for the time a file takes (the same MACs run at very different speeds in different runtimes
and widths), so the ratio is searched by doing what the deployment will do: prune a copy at a candidate ratio,
export it to the chosen artifact kind (``"onnx-int8"``, ``"executorch-int8"``, ``"aoti-int8"``, ``"eager"``, ...),
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

import torch
from torch import Tensor, nn

from pqv_lightning.export.formats import AOTI_PRECISIONS, EXECUTORCH_PRECISIONS, ONNX_PRECISIONS
from pqv_lightning.pruning import PruningSpec, largest_ratio, prune
from pqv_lightning.utils.checks import check_choice, check_int, check_number, invalid

__all__ = [
    "LATENCY_ARTIFACTS", "LatencySearch", "LatencyTarget", "measure_pruned_latency", "search_ratio", "trials_of",
]  # fmt: skip

log = logging.getLogger(__name__)

#: What a latency target can be measured on: the eager model, or a file of ``<format>-<precision>``.
LATENCY_ARTIFACTS = (
    "eager",
    *(f"onnx-{p}" for p in ONNX_PRECISIONS),
    *(f"executorch-{p}" for p in EXECUTORCH_PRECISIONS),
    *(f"aoti-{p}" for p in AOTI_PRECISIONS),
    "torchscript-fp32",
)
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
        check_choice("latency_target", self.artifact, LATENCY_ARTIFACTS)
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


@dataclass
class LatencySearch:
    """The outcome: the ``ratio`` chosen, its measured ``latency_ms``, and every trial (ratio -> ms)."""

    ratio: float
    latency_ms: float
    target: LatencyTarget
    trials: dict[float, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain data (JSON and checkpoint safe): the target, the choice, the trials as ``[ratio, ms]`` pairs."""
        return {
            **asdict(self.target),
            "ratio": self.ratio,
            "latency_ms": self.latency_ms,
            "trials": [[r, ms] for r, ms in sorted(self.trials.items())],
        }

    @classmethod
    def from_dict(cls, doc: dict) -> LatencySearch:
        """The search :meth:`as_dict` wrote (a checkpoint's state, a rank-0 broadcast)."""
        # a key missing from an older checkpoint's search takes its default
        target = LatencyTarget(**{f.name: doc[f.name] for f in fields(LatencyTarget) if f.name in doc})
        return cls(doc["ratio"], doc["latency_ms"], target, trials_of(doc["trials"]))


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
) -> float:
    """Median latency (ms) of ``model`` pruned by ``ratio`` (a copy; magnitude ranking) as ``target.artifact``."""
    from pqv_lightning.export import export_artifacts
    from pqv_lightning.measure import fresh_process_latency, make_runner, measure_latency

    x = example_input.detach().float().cpu().contiguous()
    clone = copy.deepcopy(model).cpu().float().eval()
    if ratio > 0:
        prune(clone, replace(spec, ratio=ratio, importance="l2", target_macs=None, target_params=None), x)
        clone.eval()
    previous = torch.get_num_threads()
    try:
        if target.artifact == "eager":
            return measure_latency(make_runner(clone, "eager", x, target.threads), target.warmup, target.runs).median_ms
        fmt, precision = target.format, target.precision
        with torch.no_grad():
            labels = clone(x).argmax(1)
        with tempfile.TemporaryDirectory(prefix="pqv-latency-") as work:
            (record,) = [
                r for r in export_artifacts(
                    clone, work, [fmt], x, [(x, labels)], calibration=list(calibration or [x]),
                    executorch_precisions=[precision] if fmt == "executorch" else (),
                    onnx_precisions=[precision] if fmt == "onnx" else (),
                    aoti_precisions=[precision] if fmt == "aoti" else (),
                ) if r.name == target.artifact
            ]  # fmt: skip
            if record.path is None:
                raise RuntimeError(f"{target.artifact} of the model pruned by {ratio:.4g} failed: {record.reason}")
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


def search_ratio(
    model: nn.Module,
    spec: PruningSpec,
    example_input: Tensor,
    target: LatencyTarget,
    calibration: Sequence[Tensor] | None = None,
    trials: dict[float, float] | None = None,
    measure: Callable[[float], float] | None = None,
) -> LatencySearch:
    """The smallest ratio (to within 1/64 of the prunable range) whose pruned file runs within ``target``.

    ``trials`` (ratio -> ms) are measurements already made (a cache; updated in place); a trial more than 5% slower
    than a less pruned one is measured once more and the faster reading kept (more pruning is never slower; noise
    only ever slows a reading down). ``measure(ratio)`` replaces :func:`measure_pruned_latency` (e.g. a fake in
    tests). Raises ``ValueError`` naming the latency the most-pruned model reaches when the target is below it:
    before any training, not after.
    """
    if not isinstance(target, LatencyTarget):
        raise invalid("target", type(target).__name__, "a LatencyTarget")
    cache = trials if trials is not None else {}
    measure = measure or (
        lambda r: measure_pruned_latency(model, spec, r, example_input, target, calibration)
    )  # fmt: skip

    def key_of(ratio: float) -> float:
        # rounded down: the largest ratio keeps one channel of its narrowest group only if not rounded up
        return math.floor(ratio * 10**_RATIO_DIGITS) / 10**_RATIO_DIGITS

    def ms(ratio: float) -> float:
        key = key_of(ratio)
        if key not in cache:
            cache[key] = float(measure(key))
            log.info("latency search: ratio %.4g -> %.3f ms (%s)", key, cache[key], target.describe())
            faster = [r for r, t in cache.items() if r < key and t < cache[key] * (1 - _SLOWER_BY)]
            if faster:  # a less pruned model ran faster: a slow spell of the machine, not the widths
                again = float(measure(key))
                log.info("latency search: ratio %.4g slower than the less pruned %.4g (%.3f ms); again: %.3f ms",
                         key, faster[0], cache[faster[0]], again)  # fmt: skip
                cache[key] = min(cache[key], again)
        return cache[key]

    def found(ratio: float) -> LatencySearch:
        return LatencySearch(key_of(ratio), ms(ratio), target, dict(cache))

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
