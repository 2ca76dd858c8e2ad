"""Helpers shared by the benchmark scripts: CPU model and ISA flags, fixed thread counts, the header line, timing
of each variant in its own fresh process, and recipes run as ``python train.py fit`` subprocesses.

In-process timing is the library's (:func:`pqv_lightning.measure.interleaved_latency`, round-robin so that load
from other processes hits every variant alike). :func:`interleaved_process_latency` times every variant in its
own Python process instead (a :class:`TimingWorker`, many short alternating rounds), so that no runtime's thread
pool, allocator or import side effects can slow another one down.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pqv_lightning.export.probe import READY_TAG, SERVE_KINDS, TIMING_TAG, serve_command
from pqv_lightning.measure import CpuInfo, LatencyStats, cpu_info, interleaved_latency, set_threads
from pqv_lightning.utils.checks import check_choice, check_int, invalid

__all__ = [
    "FIT_END",
    "REPO",
    "CpuInfo",
    "FitRun",
    "LatencyStats",
    "ProcessLatency",
    "TimingWorker",
    "Variant",
    "busy_cores",
    "cpu_family",
    "cpu_info",
    "drop_callbacks",
    "fix_threads",
    "header",
    "interleaved_latency",
    "interleaved_process_latency",
    "load_average",
    "openvino_missing",
    "ratio",
    "run_recipe",
]


def cpu_family() -> str:
    """``cpu family`` from ``/proc/cpuinfo`` (e.g. 25 = AMD Zen 3/4, 26 = Zen 5), "" if unknown."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "cpu family":
                return value.strip()
    return ""


def fix_threads(threads: int) -> dict[str, int]:
    """Fix torch intra-op (and, if still possible, inter-op) threads and the ExecuTorch XNNPACK threadpool
    to ``threads``; onnxruntime sessions get theirs from :func:`pqv_lightning.measure.make_runner`.
    ``OMP_NUM_THREADS`` is exported for child processes."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(threads)
    return set_threads(threads)


def load_average() -> str:
    """The 1/5/15-minute load averages, as printed by every benchmark."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def busy_cores(seconds: float = 2.0) -> float | None:
    """How many cores other processes keep busy, measured from ``/proc/stat`` while this one sleeps for
    ``seconds`` (the load average would count this benchmark's own export work of the last minutes);
    None where ``/proc/stat`` is unavailable."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def header(threads: int) -> str:
    """Lines stating CPU, ISA, load, thread counts and library versions, for every benchmark's output."""
    from importlib import metadata

    cpu = cpu_info()
    applied = fix_threads(threads)
    versions = []
    for pkg in ("torch", "executorch", "onnxruntime", "timm"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return "\n".join(
        [
            f"CPU: {cpu.model} (cpu family {cpu_family() or '?'}, {cpu.cores} logical cores) | "
            f"avx512_vnni: {'yes' if cpu.vnni else 'NO'}",
            f"ISA: {cpu.isa()} avx512_bf16={'yes' if 'avx512_bf16' in cpu.flags else 'no'}",
            f"load average (1/5/15 min) at start: {load_average()}",
            f"threads: torch {applied['torch']}, ExecuTorch XNNPACK threadpool {applied.get('executorch', 'n/a')},"
            f" onnxruntime intra-op {threads} (inter-op 1)",
            ", ".join(versions),
        ]
    )


def ratio(reference: LatencyStats | None, candidate: LatencyStats | None) -> float | None:
    """Speed-up of ``candidate`` over ``reference`` (ratio of medians), None if either is missing."""
    if reference is None or candidate is None:
        return None
    return reference.median_ms / candidate.median_ms


# --------------------------------------------------------------------------- fresh-process timing

#: ``"openvino"``: a peer, an ONNX file read by OpenVINO with its defaults (benchmarks/_openvino_serve.py).
CHILD_KINDS = (*SERVE_KINDS, "openvino")
_OPENVINO_SERVE = Path(__file__).with_name("_openvino_serve.py")


def openvino_missing() -> str | None:
    """Why the OpenVINO peer cannot run here (``None`` when it can)."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install .[benchmarks])"
    return None


@dataclass(frozen=True)
class Variant:
    """How a fresh process loads one variant to time.

    ``path``: the artifact (``.pt``/``.ptl``/``.onnx``/``.pte``), or for ``"eager"`` a ``state_dict`` file
    (read with ``weights_only=True``) of the timm model ``model`` built with ``model_kwargs``; ``structure``:
    a JSON pruning structure replayed with :func:`pqv_lightning.pruning.apply_structure` before loading it;
    ``tokens``: for ``"eager"``, the token reduction (``TokenReduction.as_dict()``) the worker applies after the
    structure, so that it times the reducing model (a file carries its own reduction).
    ``engine``: the ``torch.backends.quantized`` engine a torch.ao INT8 TorchScript/lite file needs.
    ``ort_spinning``: onnxruntime's default (idle intra-op workers spin) when True, spinning off when False.
    """

    kind: str
    path: str
    engine: str | None = None
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    structure: str | None = None
    ort_spinning: bool = True
    tokens: dict | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, CHILD_KINDS)
        if self.kind == "eager" and not self.model:
            raise invalid("model", self.model, "a timm model name for an 'eager' variant (path= its state_dict file)")
        if self.tokens is not None:
            if self.kind != "eager":
                accepted = f"None for a {self.kind!r} variant (a file runs its own reduction)"
                raise invalid("tokens", self.tokens, accepted)
            from pqv_lightning.tokens import TokenReduction

            TokenReduction.from_dict(self.tokens)  # refused here, not in the worker


class TimingWorker:
    """One variant loaded in its own Python process (environment: this one's, ``OMP_NUM_THREADS=threads``,
    then ``env``), warmed up with ``warmup`` calls, then timed batch by batch with :meth:`time`.

    The process is ``python -m pqv_lightning.export.probe serve``: it imports only what the variant's runtime
    needs (onnxruntime workers never import torch), prints ``PQV_READY`` once loaded, and answers each request
    for ``n`` calls with one untimed call and ``n`` timed ones.

    Keeping the process between batches lets many short, alternating rounds sample the machine's slow and
    quiet periods alike at the cost of one model load per variant; between batches it blocks on its stdin,
    so it uses no CPU while the others are timed. Use it as a context manager (the process is ended on exit).
    """

    def __init__(
        self,
        variant: Variant,
        input_shape: list[int],
        threads: int,
        warmup: int,
        env: dict[str, str] | None = None,
        timeout: float = 600,
    ) -> None:
        self.variant, self.timeout = variant, timeout
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", **(env or {})}
        # stderr to a file, not a pipe: a chatty runtime cannot block; closed in __exit__
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        if variant.kind == "openvino":
            shape = ",".join(str(int(s)) for s in input_shape)
            command = [sys.executable, str(_OPENVINO_SERVE), variant.path, "--shape", shape,
                       "--threads", str(threads), "--warmup", str(warmup)]  # fmt: skip
        else:
            command = serve_command(
                variant.kind, variant.path, input_shape, threads, warmup, engine=variant.engine,
                ort_spinning=variant.ort_spinning, model=variant.model, model_kwargs=variant.model_kwargs,
                structure=variant.structure, tokens=variant.tokens,
            )  # fmt: skip
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, bufsize=1,
        )  # fmt: skip
        #: what the worker's ready line reports about the loaded variant (JSON, "" if nothing), e.g. an eager
        #: model's token reduction ``{"tokens": {"method": ..., "r": ..., "tokens_per_block": [...]}}``.
        self.ready = self._read(READY_TAG)

    def _read(self, tag: str) -> str:
        """The rest of the next stdout line starting with ``tag``; a worker silent for ``timeout`` s is killed."""
        watchdog = threading.Timer(self.timeout, self._proc.kill)
        watchdog.start()
        try:
            for line in self._proc.stdout:
                if line.startswith(tag):
                    return line[len(tag) :].strip()
        finally:
            watchdog.cancel()
        self.close()
        self._stderr.seek(0)
        tail = self._stderr.read().strip().splitlines()[-3:]
        raise RuntimeError(
            f"timing worker for {self.variant.kind} {self.variant.path} failed (rc {self._proc.returncode}): {tail}"
        )

    def time(self, runs: int) -> tuple[list[float], list[float]]:
        """Per-call wall-clock and process-CPU milliseconds of ``runs`` calls (after one untimed call)."""
        with contextlib.suppress(BrokenPipeError):  # a dead worker is reported by _read, with its stderr
            self._proc.stdin.write(f"{runs}\n")
        result = json.loads(self._read(TIMING_TAG))
        return result["wall_ms"], result["cpu_ms"]

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> TimingWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self._stderr.close()


@dataclass(frozen=True)
class ProcessLatency:
    """Latency of one variant over alternating rounds: the wall-clock samples of all rounds pooled, the median
    process CPU time per call (all threads; less sensitive to other load than wall-clock), and each round's
    wall-clock median.

    ``median_ms`` is the median of the quietest round (the smallest round median): on a shared machine whose
    speed drifts for tens of seconds at a time (measured here: the same process at 14 ms per call, then 19 ms
    for a minute, with twice the CPU time per call), it estimates the latency on an undisturbed machine and is
    what two runs reproduce; ``pooled`` shows what the slow periods did to the rest. With several processes per
    variant, the quietest round is also the fastest process's.
    """

    pooled: LatencyStats
    cpu_median_ms: float
    round_medians_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return min(self.round_medians_ms)

    @property
    def p90_ms(self) -> float:
        return self.pooled.p90_ms


def interleaved_process_latency(
    variants: dict[str, Variant],
    input_shape: list[int],
    threads: int,
    warmup: int,
    runs: int,
    rounds: int,
    progress: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    failures: dict[str, str] | None = None,
    processes: int = 1,
    pause_s: float = 0.05,
    ready: dict[str, str] | None = None,
) -> dict[str, ProcessLatency]:
    """Time every variant in ``rounds`` alternating rounds of ``ceil(runs / rounds)`` calls each, every variant
    in its own :class:`TimingWorker` (loaded one after another, so no load overlaps timing; ``warmup`` calls
    first). The rounds are split over ``processes`` successive sets of fresh workers, because some runtimes run
    at a different speed in different processes of the same file (measured here: torch.ao INT8 through fbgemm
    at 13 or 23 ms per call, whole process lifetimes long). The starting variant rotates every round and each
    batch follows a ``pause_s`` pause in which the previous worker's idle thread pool goes to sleep. ``env`` is
    added to every worker's environment. With a ``failures`` dict, a variant whose worker fails is dropped (the
    reason stored there under its label) instead of ending the whole run. With a ``ready`` dict, what each
    variant's first worker reported when loaded (:attr:`TimingWorker.ready`) is stored there under its label."""
    if not variants:
        raise ValueError("variants is empty: nothing to time")
    for name, value in (("threads", threads), ("runs", runs), ("rounds", rounds)):
        check_int(name, value, 1)
    check_int("processes", processes, 1, rounds, accepted=f"an int in [1, rounds] = [1, {rounds}]")
    check_int("warmup", warmup, 0)
    per_round = -(-runs // rounds)
    labels = list(variants)
    wall: dict[str, list[float]] = {lab: [] for lab in labels}
    cpu: dict[str, list[float]] = {lab: [] for lab in labels}
    medians: dict[str, list[float]] = {lab: [] for lab in labels}

    def failed(label: str, error: Exception) -> None:
        if failures is None:
            raise error
        failures[label] = str(error)

    def alive(label: str) -> bool:
        return failures is None or label not in failures

    bounds = [rounds * g // processes for g in range(processes + 1)]
    for g in range(processes):
        with contextlib.ExitStack() as stack:
            workers: dict[str, TimingWorker] = {}
            for label in filter(alive, labels):
                try:
                    workers[label] = stack.enter_context(
                        TimingWorker(variants[label], input_shape, threads, warmup, env)
                    )
                    if ready is not None:
                        ready.setdefault(label, workers[label].ready)
                except RuntimeError as e:
                    failed(label, e)
            if progress is not None:
                progress(f"process set {g + 1}/{processes}: {len(workers)} workers loaded (load {load_average()})")
            for r in range(bounds[g], bounds[g + 1]):
                shift = r % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    if label not in workers:  # failed to load, or to time in an earlier round
                        continue
                    time.sleep(pause_s)
                    try:
                        w, c = workers[label].time(per_round)
                    except (RuntimeError, ValueError) as e:
                        del workers[label]  # the exit stack still ends its process
                        failed(label, e)
                        continue
                    wall[label] += w
                    cpu[label] += c
                    medians[label].append(statistics.median(w))
            if progress is not None:
                progress(f"round {bounds[g + 1]}/{rounds} done (load {load_average()})")
    return {
        lab: ProcessLatency(LatencyStats.from_samples(wall[lab]), statistics.median(cpu[lab]), tuple(medians[lab]))
        for lab in labels
        if medians[lab] and alive(lab)
    }


# --------------------------------------------------------------------------- recipes as a user runs them

REPO = Path(__file__).resolve().parents[1]
#: The callbacks that run at fit end (quantization, export, report): dropped to study the training alone.
FIT_END = ("Quantization", "MobileExport", "TradeoffReport")

#: A callback added to every run (``--trainer.callbacks+=epoch_log.EpochLog``): ``val/top1`` after every epoch.
_EPOCH_LOG = """
import json
import lightning.pytorch as pl


class EpochLog(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path, self.top1 = path, []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.top1.append(float(trainer.callback_metrics["val/top1"]))
            with open(self.path, "w") as f:
                json.dump(self.top1, f)
"""


def drop_callbacks(recipe: dict, names: Iterable[str]) -> dict:
    """A copy of ``recipe`` (a parsed ``train.py`` YAML) without the callbacks whose class is named in ``names``."""
    names = set(names)
    recipe = copy.deepcopy(recipe)
    recipe["trainer"]["callbacks"] = [
        cb for cb in recipe["trainer"].get("callbacks") or () if cb["class_path"].rsplit(".", 1)[-1] not in names
    ]
    return recipe


@dataclass
class FitRun:
    """One ``train.py fit`` subprocess: its exit status, wall time, ``val/top1`` after each epoch, its folder
    (logs and checkpoints under ``runs/``) and the last lines of its stderr."""

    seed: int
    returncode: int
    seconds: float
    top1: list[float]
    folder: Path
    stderr_tail: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.top1)

    def checkpoint(self, which: str = "last") -> Path:
        """``"last"`` (``LastCheckpoint``'s ``last.ckpt``) or ``"best"`` (the monitoring ``ModelCheckpoint``'s)."""
        files = sorted((self.folder / "runs").rglob("*.ckpt"))
        found = [f for f in files if (f.name == "last.ckpt") == (which == "last")]
        if len(found) != 1:
            names = [str(f) for f in found]
            raise FileNotFoundError(f"{which} checkpoint of {self.folder}: expected one, found {names}")
        return found[0]


def run_recipe(
    recipe: dict, seed: int, folder: Path, extra: Sequence[str] = (), env: dict[str, str] | None = None
) -> FitRun:
    """``python train.py fit --config <recipe> --seed_everything <seed>`` in ``folder`` (created), as a user runs it
    (the recipe's own callbacks and data), with a TensorBoard logger under ``folder/runs``, a callback recording
    ``val/top1`` after every epoch and no progress bar; ``extra`` flags go to ``train.py``, ``env`` is added to the
    environment. Runs in separate folders do not share anything, so several can run at once."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "epoch_log.py").write_text(_EPOCH_LOG)
    recipe = copy.deepcopy(recipe)
    recipe["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(folder / "runs"), "name": "fit"},
    }
    import yaml

    config, log = folder / "recipe.yaml", folder / "top1.json"
    config.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--seed_everything", str(seed),
               "--trainer.callbacks+=epoch_log.EpochLog", f"--trainer.callbacks.path={log}",
               "--trainer.enable_progress_bar=false", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONWARNINGS": "ignore", **(env or {})}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    top1 = json.loads(log.read_text()) if log.exists() else []
    return FitRun(seed, done.returncode, seconds, top1, folder, done.stderr.strip().splitlines()[-3:])
