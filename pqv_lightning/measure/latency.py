"""Latency as a distribution: warm-up calls first, then median / p90 / mean / std / min over many timed calls.

Several variants are best timed round-robin (:func:`interleaved_latency`) so that load from other processes
hits all alike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pqv_lightning.utils.checks import check_callable, check_int

__all__ = ["LatencyStats", "interleaved_latency", "measure_latency"]


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one call, in milliseconds, over ``runs`` timed calls after warm-up."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if len(samples_ms) == 0:
            raise ValueError("no latency samples")
        values = sorted(float(v) for v in samples_ms)
        # nearest-rank 90th percentile: an observed value, never below the median
        p90 = values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]
        return cls(
            median_ms=statistics.median(values),
            p90_ms=max(p90, statistics.median(values)),
            mean_ms=statistics.fmean(values),
            std_ms=statistics.pstdev(values) if len(values) > 1 else 0.0,
            min_ms=values[0],
            runs=len(values),
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_latency(run: Callable[[], Any], warmup: int = 10, runs: int = 50) -> LatencyStats:
    """Time ``run()`` ``runs`` times after ``warmup`` untimed calls."""
    check_int("warmup", warmup, 0)
    check_int("runs", runs, 1)
    check_callable("run", run, "a callable taking no arguments")
    return interleaved_latency({"run": run}, warmup, runs)["run"]


def interleaved_latency(
    runs_by_name: dict[str, Callable[[], Any]], warmup: int = 10, runs: int = 50
) -> dict[str, LatencyStats]:
    """Time several variants round-robin (one call of each per round), so that drift in machine load hits
    every variant alike. Each variant is warmed up before the first round."""
    check_int("warmup", warmup, 0)
    check_int("runs", runs, 1)
    if not runs_by_name:
        raise ValueError("runs_by_name is empty: nothing to time")
    with torch.inference_mode():
        for fn in runs_by_name.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in runs_by_name}
        for _ in range(runs):
            for name, fn in runs_by_name.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: LatencyStats.from_samples(values) for name, values in samples.items()}
