"""Latency of a file in a fresh process: what a deployment sees, untouched by the thread pools, allocator and
imports of the process that asks. Measured here: the digits ViT's ONNX INT8 file timed inside the training
process took 0.55 ms before the fit and 1.18 ms after it (torch's OpenMP workers stay busy beside it); timed in
fresh processes, the search's candidate and the shipped file agreed within 1%."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence

from pqv_lightning.export import probe
from pqv_lightning.measure.latency import LatencyStats
from pqv_lightning.measure.runner import file_kinds
from pqv_lightning.utils.checks import check_choice, check_int

__all__ = ["fresh_process_latency"]


def fresh_process_latency(
    path: str | os.PathLike,
    kind: str,
    input_shape: Sequence[int],
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    engine: str | None = None,
    ort_spinning: bool = True,
    timeout: float = 900,
    rounds: int = 1,
) -> LatencyStats:
    """Load ``path`` (a file of ``kind``) in ``python -m pqv_lightning.export.probe serve`` at ``threads`` threads,
    call it ``warmup`` times, then time ``runs`` calls on a random input of ``input_shape``.

    With ``rounds`` > 1 the calls are made in that many batches of ``ceil(runs / rounds)``, one after another, and
    the statistics of the quietest batch (smallest median) are returned: on a shared machine whose speed drifts
    for seconds at a time it is the undisturbed latency, the estimate the benchmarks' quietest-round medians use.

    ``ort_spinning`` keeps onnxruntime's default (idle workers spin between operators), as a deployment alone on
    its cores runs it; without spinning, waking the workers for every operator costs deit_small at 2 threads
    about a third more here."""
    check_choice("kind", kind, file_kinds())
    check_int("threads", threads, 1)
    check_int("warmup", warmup, 0)
    check_int("runs", runs, 1)
    check_int("rounds", rounds, 1, runs, accepted=f"an int in [1, runs] = [1, {runs}]")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = probe.serve_command(
        kind, str(path), list(input_shape), threads, warmup, engine=engine, ort_spinning=ort_spinning
    )
    requests = f"{-(-runs // rounds)}\n" * rounds
    done = subprocess.run(command, input=requests, capture_output=True, text=True, env=env, timeout=timeout)
    batches = [
        LatencyStats.from_samples(json.loads(line.split(" ", 1)[1])["wall_ms"])
        for line in done.stdout.splitlines()
        if line.startswith(probe.TIMING_TAG + " ")
    ]
    if len(batches) == rounds:
        return min(batches, key=lambda stats: stats.median_ms)
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"timing process for {kind} {path} failed (rc {done.returncode}): {tail}")
