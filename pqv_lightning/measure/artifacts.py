"""Latency and memory of every verified file of an export, from its records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch

from pqv_lightning.export.manifest import ArtifactRecord
from pqv_lightning.measure.latency import interleaved_latency
from pqv_lightning.measure.memory import peak_memory, runtime_baseline_memory
from pqv_lightning.measure.runner import Runner, file_kinds, make_runner
from pqv_lightning.utils.checks import check_choice, check_int

__all__ = ["measure_artifacts"]


def measure_artifacts(
    records: Sequence[ArtifactRecord],
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    memory: bool = True,
    memory_runs: int = 3,
) -> list[dict]:
    """Latency (and, with ``memory``, peak RSS of a fresh process) of every ``"ok"`` record.

    Returns one dict per record (its fields plus ``latency`` (``LatencyStats`` as a dict), ``threads``,
    ``batch``, ``throughput_ips``, ``peak_rss_bytes``, ``runtime_baseline_rss_bytes``); records that are not
    ``"ok"`` are returned with ``measured=False``. The ok records are timed round-robin at their export
    input shape, on random inputs.
    """
    check_int("threads", threads, 1)
    check_int("warmup", warmup, 0)
    check_int("runs", runs, 1)
    rows: list[dict] = []
    runners: dict[str, Runner] = {}
    for i, rec in enumerate(records):
        row = asdict(rec)
        row["extra"] = {k: v for k, v in row["extra"].items() if k != "traceback"}
        row["measured"] = rec.status == "ok"
        rows.append(row)
        if rec.status == "ok":
            check_choice(f"records[{i}].format", rec.format, file_kinds())
            x = torch.randn(rec.input_shape)
            runners[str(i)] = make_runner(rec.path, rec.format, x, threads, rec.engine)
    stats = interleaved_latency(runners, warmup, runs) if runners else {}
    baselines: dict[tuple[str, tuple[int, ...]], int] = {}
    for i, (rec, row) in enumerate(zip(records, rows, strict=True)):
        if str(i) not in stats:
            continue
        lat = stats[str(i)]
        batch = int(rec.input_shape[0])
        row.update(latency=lat.as_dict(), threads=threads, batch=batch, throughput_ips=batch * 1e3 / lat.median_ms)
        if memory:
            key = (rec.format, tuple(rec.input_shape))
            if key not in baselines:
                baselines[key] = runtime_baseline_memory(rec.format, rec.input_shape, threads)
            row["peak_rss_bytes"] = peak_memory(rec.path, rec.format, rec.input_shape, threads, memory_runs, rec.engine)
            row["runtime_baseline_rss_bytes"] = baselines[key]
    return rows
