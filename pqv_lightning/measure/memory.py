"""Peak memory of a fresh process that loads and runs one file, next to the same process without the model:
the interpreter and the runtime's libraries dominate a small model's RSS."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pqv_lightning.export import probe
from pqv_lightning.measure.runner import file_kinds
from pqv_lightning.utils.checks import check_choice, check_int, invalid

__all__ = ["peak_memory", "runtime_baseline_memory"]


def _probe_peak(kind: str, path: str | None, input_shape: Sequence[int], threads: int, runs: int, engine) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    command = probe.memory_command(kind, path, input_shape, threads, runs, engine)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    peak = probe.read_peak(proc.stdout)
    if peak is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory probe for {kind} {path or '(baseline)'} failed (rc {proc.returncode}): {tail}")
    return peak


def _check_memory_args(kind: str, input_shape: Sequence[int], threads: int, runs: int) -> None:
    check_choice("kind", kind, file_kinds())
    check_int("threads", threads, 1)
    check_int("runs", runs, 1)
    if not input_shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape):
        raise invalid("input_shape", input_shape, "a list of positive ints")


def peak_memory(
    artifact_path: str | os.PathLike,
    kind: str,
    input_shape: Sequence[int],
    threads: int = 1,
    runs: int = 3,
    engine: str | None = None,
) -> int:
    """Peak resident set size in bytes (raw ``VmHWM``; ``ru_maxrss`` off Linux) of a fresh Python process
    (:mod:`pqv_lightning.export.probe`) that imports the runtime of ``kind``, loads ``artifact_path`` and runs
    it ``runs`` times on a random input.

    The process also holds the interpreter and the runtime's libraries: compare with
    :func:`runtime_baseline_memory` to see the model's own share.
    """
    _check_memory_args(kind, input_shape, threads, runs)
    if not Path(artifact_path).is_file():
        raise FileNotFoundError(f"artifact_path {str(artifact_path)!r} is not a file")
    return _probe_peak(kind, str(artifact_path), input_shape, threads, runs, engine)


def runtime_baseline_memory(kind: str, input_shape: Sequence[int], threads: int = 1) -> int:
    """Peak RSS in bytes of the same fresh process as :func:`peak_memory` without loading any model."""
    _check_memory_args(kind, input_shape, threads, 1)
    return _probe_peak(kind, None, input_shape, threads, 1, None)
