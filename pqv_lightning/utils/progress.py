"""Progress of long work a user waits for (the fit-end chain, ``pqv-export``, latency searches, sweeps).

One :class:`Progress` per job: each stage is a ``with progress.stage(name, total)`` block in which ``step(label)``
marks one unit done (a quantized variant, a verified file, a measured variant, a latency trial). In a terminal a
stage is a progress bar; elsewhere (a log file, CI, a notebook's captured stream) it is one line per step, so that
progress is visible and never mistaken for a hang. When the job ends, one line gives the elapsed time per stage.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``"42.1 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Reports the stages and steps of one job on ``stream`` (standard error by default).

    Args:
        job: what the lines start with (``"fit end"``, ``"pqv-export"``).
        stream: where to write; ``None`` writes nothing (a silent job: other ranks, tests that ask for quiet).
        bar: a progress bar per stage (``None``: when ``stream`` is a terminal), else one line per step.
    """

    def __init__(self, job: str, stream: IO[str] | None = sys.stderr, bar: bool | None = None) -> None:
        self.job = job
        self.stream = stream
        self.bar = bool(bar if bar is not None else stream is not None and getattr(stream, "isatty", lambda: False)())
        self.elapsed: dict[str, float] = {}
        self._start = time.perf_counter()
        self._stage: str | None = None
        self._total = 0
        self._done = 0
        self._stage_start = 0.0
        self._tqdm: Any = None

    @classmethod
    def silent(cls, job: str = "") -> Progress:
        """A progress that reports nothing but still times its stages."""
        return cls(job, stream=None)

    def _write(self, line: str) -> None:
        if self.stream is None:
            return
        if self._tqdm is not None:
            self._tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, total: int) -> Iterator[Progress]:
        """A stage of ``total`` steps; its elapsed time is kept (also when it raises)."""
        self._stage, self._total, self._done = name, max(int(total), 0), 0
        self._stage_start = time.perf_counter()
        if self.bar and self.stream is not None:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self._total, desc=f"{self.job}: {name}", file=self.stream, leave=True, unit="step")
        else:
            self._write(f"{self.job}: {name} ({self._total} step{'s' * (self._total != 1)}) ...")
        try:
            yield self
        finally:
            seconds = time.perf_counter() - self._stage_start
            self.elapsed[name] = self.elapsed.get(name, 0.0) + seconds
            if self._tqdm is not None:
                self._tqdm.close()
                self._tqdm = None
            self._write(
                f"{self.job}: {name} done: {self._done} step{'s' * (self._done != 1)} in {format_seconds(seconds)}"
            )
            self._stage = None

    def step(self, label: str, note: str = "") -> None:
        """One step of the current stage is done: ``label`` (what), ``note`` (its outcome, in a few words)."""
        self._done += 1
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(f"{label} {note}".strip()[:60], refresh=False)
            self._tqdm.update(1)
            return
        seconds = time.perf_counter() - self._stage_start
        total = f"/{self._total}" if self._total else ""
        detail = f" {note}" if note else ""
        self._write(f"{self.job}: {self._stage} {self._done}{total} {label}{detail} [{format_seconds(seconds)}]")

    def summary(self) -> str:
        """The elapsed time of the job and of each stage, in one line."""
        total = time.perf_counter() - self._start
        parts = ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in self.elapsed.items())
        return f"{self.job}: done in {format_seconds(total)}" + (f" ({parts})" if parts else "")

    def finish(self) -> str:
        """Write :meth:`summary` and return it."""
        line = self.summary()
        self._write(line)
        return line
