"""The latency / memory / accuracy trade-off of a model's variants, measured.

A *variant* is one way to ship the model: the eager float network (and the dense one it was pruned from),
each quantized eager module, and every exported file, each run in its own runtime. For each the report holds
validation accuracy (computed through that runtime), latency (batch 1 and, where the runtime accepts it, a
larger batch), file size, peak memory of a fresh process, parameters and MACs. Variants on the Pareto front of
latency vs top-1 (nothing else is both faster and at least as accurate) are marked: those are the choices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pqv_lightning.export.formats import format_names, get_format
from pqv_lightning.measure import (
    LatencyStats,
    interleaved_latency,
    make_runner,
    peak_memory,
    runtime_baseline_memory,
)
from pqv_lightning.utils.checks import check_int
from pqv_lightning.utils.progress import Progress

if TYPE_CHECKING:
    from pqv_lightning.export import ArtifactRecord

__all__ = ["EagerVariant", "TradeoffPoint", "measure_tradeoffs", "pareto_front"]


@dataclass
class EagerVariant:
    """An in-process PyTorch module to measure next to the exported files.

    ``top1``/``top5``/``agreement`` are fractions (as logged in ``val/top1``), measured by the caller.
    """

    name: str
    network: str
    precision: str
    module: nn.Module
    backend: str = "-"
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None


@dataclass
class TradeoffPoint:
    """One measured variant (one report row). Accuracies are fractions; latencies are per call."""

    name: str
    network: str
    runtime: str
    precision: str
    backend: str
    status: str = "ok"
    reason: str | None = None
    path: str | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None
    latency: LatencyStats | None = None
    batch: int | None = None
    batch_latency: LatencyStats | None = None
    batch_note: str | None = None
    peak_rss_bytes: int | None = None
    runtime_rss_bytes: int | None = None
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float | None:
        """Median latency of one batch-1 call."""
        return None if self.latency is None else self.latency.median_ms

    @property
    def batch_ms_per_image(self) -> float | None:
        if self.batch_latency is None or not self.batch:
            return None
        return self.batch_latency.median_ms / self.batch

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["latency_ms"] = self.latency_ms
        row["batch_ms_per_image"] = self.batch_ms_per_image
        return row


def pareto_front(points: Sequence[TradeoffPoint]) -> list[bool]:
    """Which points no other point dominates (at most as slow and at least as accurate, strictly better in one).

    Points without a latency or a top-1 (failed, skipped, unmeasured) are never on the front.
    """
    measured = [
        (i, p.latency_ms, p.top1) for i, p in enumerate(points) if p.latency_ms is not None and p.top1 is not None
    ]
    front = [False] * len(points)
    for i, lat, acc in measured:
        front[i] = not any(
            (lat2 <= lat and acc2 >= acc) and (lat2 < lat or acc2 > acc) for j, lat2, acc2 in measured if j != i
        )
    return front


def _count(model: nn.Module, example_input: Tensor) -> tuple[int | None, int | None]:
    from pqv_lightning.pruning import count_macs_params

    try:
        macs, params = count_macs_params(model, example_input[:1])
    except Exception:  # an exotic module torch-pruning cannot trace: parameters still count
        return None, sum(p.numel() for p in model.parameters())
    return macs, params


def _batched(x: Tensor, batch: int) -> Tensor:
    return x[:1].expand(batch, *x.shape[1:]).contiguous()


def measure_tradeoffs(
    eager: Sequence[EagerVariant],
    records: Sequence[ArtifactRecord],
    example_input: Tensor,
    *,
    networks: dict[str, nn.Module] | None = None,
    files_network: str = "float",
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    batch: int | None = 16,
    memory: bool = True,
    progress: Progress | None = None,
) -> list[TradeoffPoint]:
    """Measure every eager variant and every ``"ok"`` exported file, all with ``threads`` threads.

    Latency: batch 1, timed round-robin over all variants (:func:`pqv_lightning.measure.interleaved_latency`);
    then, separately, at ``batch`` for every variant whose runtime accepts that shape (exported files are
    fixed to their export shape unless the runtime resizes; ExecuTorch programs never do). Memory: the peak RSS
    of a fresh process loading and running each file (eager variants live in this process: none).
    ``networks`` maps a network name (``"dense"``, ``"pruned"``) to its float module, for parameters and
    MACs; exported files belong to ``files_network``. Failed or skipped records become rows with their reason.
    ``progress`` gets a step per measurement: batch-1 latency, batch latency, and each file's memory.
    """
    progress = progress or Progress.silent()
    check_int("batch", batch, 2, allow_none=True, accepted="None or an int >= 2 (batch 1 is always measured)")
    x = example_input[:1].detach().float().contiguous()
    counts = {name: _count(module, x) for name, module in (networks or {}).items()}
    points: list[TradeoffPoint] = []
    runners: dict[int, Any] = {}
    eager_modules: dict[int, nn.Module] = {}
    for v in eager:
        macs, params = counts.get(v.network, (None, None))
        point = TradeoffPoint(
            v.name,
            v.network,
            "eager",
            v.precision,
            v.backend,
            params=params,
            macs=macs,
            top1=v.top1,
            top5=v.top5,
            agreement=v.agreement,
        )
        runners[len(points)] = make_runner(v.module, "eager", x, threads)
        eager_modules[len(points)] = v.module
        points.append(point)
    files: dict[int, ArtifactRecord] = {}
    for rec in records:
        macs, params = counts.get(files_network, (None, None))
        point = TradeoffPoint(
            rec.name,
            files_network,
            rec.format,
            rec.precision,
            rec.backend,
            status=rec.status,
            reason=rec.reason,
            path=rec.path,
            params=params,
            macs=macs,
            size_bytes=rec.size_bytes,
            top1=rec.val_top1,
            top5=rec.val_top5,
            agreement=rec.top1_agreement,
        )
        if rec.status == "ok" and rec.format in format_names() and rec.path:
            if list(rec.input_shape[1:]) != list(x.shape[1:]) or rec.input_shape[0] != 1:
                point.reason = f"exported for input {rec.input_shape}, not measured at batch 1"
            else:
                runners[len(points)] = make_runner(rec.path, rec.format, x, threads, rec.engine)
                files[len(points)] = rec
        points.append(point)

    stats = interleaved_latency(runners, warmup, runs) if runners else {}
    for i, lat in stats.items():
        points[i].latency = lat
    progress.step("latency at batch 1", f"{len(stats)} variants, {runs} rounds")

    if batch is not None:
        xb = _batched(x, batch)
        batch_runners: dict[int, Any] = {}
        for i in runners:
            point = points[i]
            if point.runtime in format_names() and get_format(point.runtime).fixed_shape:
                point.batch_note = "fixed-shape program (exported at batch 1)"
                continue
            source = eager_modules[i] if i in eager_modules else files[i].path
            try:
                runner = make_runner(source, point.runtime, xb, threads, files[i].engine if i in files else None)
                out = runner.predict(xb)
                if out.shape[0] != batch:
                    raise RuntimeError(f"returned batch {out.shape[0]}")
            except Exception as err:  # fixed-shape graphs refuse other batch sizes: a fact, not a failure
                point.batch_note = f"does not run at batch {batch}: {str(err).strip().splitlines()[0][:120]}"
                continue
            batch_runners[i] = runner
        batch_stats = (
            interleaved_latency(batch_runners, max(1, warmup // 2), max(5, runs // 5)) if batch_runners else {}
        )
        for i, lat in batch_stats.items():
            points[i].batch, points[i].batch_latency = batch, lat
        progress.step(f"latency at batch {batch}", f"{len(batch_stats)} variants")
    del runners

    if memory:
        _measure_memory(points, files, threads, progress)
    for point, on_front in zip(points, pareto_front(points), strict=True):
        point.pareto = on_front
    return points


def _measure_memory(
    points: list[TradeoffPoint], files: dict[int, ArtifactRecord], threads: int, progress: Progress
) -> None:
    """Peak RSS of every file and of each runtime's bare process, one fresh process each. Their peaks do not
    depend on each other, so as many run at once as there are cores (each at ``threads`` threads): latency was
    timed before, on a quiet machine."""
    baselines = {rec.format: rec.input_shape for rec in files.values()}
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) // threads)) as pool:
        bare = {kind: pool.submit(runtime_baseline_memory, kind, shape, threads) for kind, shape in baselines.items()}
        peaks = {
            i: pool.submit(peak_memory, rec.path, rec.format, rec.input_shape, threads, 3, rec.engine)
            for i, rec in files.items()
        }
        for i, rec in files.items():
            try:
                points[i].runtime_rss_bytes = bare[rec.format].result()
                points[i].peak_rss_bytes = peaks[i].result()
                progress.step(f"memory of {rec.name}", f"peak {points[i].peak_rss_bytes / 2**20:.0f} MiB")
            except Exception as err:
                points[i].extra["memory_error"] = f"{type(err).__name__}: {err}"[:300]
                progress.step(f"memory of {rec.name}", "failed")
