"""Measure exported models: latency distributions, peak memory of a fresh process, per-operator time.

Every runtime runs with a fixed, recorded thread count (:mod:`~.machine`); latency is a distribution timed
round-robin (:mod:`~.latency`) on a model loaded in its own runtime (:mod:`~.runner`); memory is the peak RSS
of a fresh process (:mod:`~.memory`); :mod:`~.profile` says which operators take the time and
:mod:`~.artifacts` measures every verified file of an export; :mod:`~.process` times a file in a fresh process.
"""

from pqv_lightning.measure.artifacts import measure_artifacts
from pqv_lightning.measure.latency import LatencyStats, interleaved_latency, measure_latency
from pqv_lightning.measure.machine import ISA_FLAGS, CpuInfo, cpu_info, set_threads
from pqv_lightning.measure.memory import peak_memory, runtime_baseline_memory
from pqv_lightning.measure.process import fresh_process_latency
from pqv_lightning.measure.profile import OpTime, operator_profile
from pqv_lightning.measure.runner import FILE_KINDS, KINDS, Runner, file_kinds, kind_of, kinds, make_runner

__all__ = [
    "FILE_KINDS",
    "ISA_FLAGS",
    "KINDS",
    "CpuInfo",
    "LatencyStats",
    "OpTime",
    "Runner",
    "cpu_info",
    "file_kinds",
    "fresh_process_latency",
    "interleaved_latency",
    "kind_of",
    "kinds",
    "make_runner",
    "measure_artifacts",
    "measure_latency",
    "operator_profile",
    "peak_memory",
    "runtime_baseline_memory",
    "set_threads",
]
