"""A fresh process that loads one artifact (:func:`~pqv_lightning.export.load_artifact`) and measures it.

Run as ``python -m pqv_lightning.export.probe MODE KIND [PATH] --shape 1,3,224,224 [options]``; it imports only
the runtime of ``KIND`` (an onnxruntime probe never imports torch). Modes:

* ``memory``: load ``PATH`` and run it ``--runs`` times on a random input, then print ``PQV_PEAK_RSS <bytes>``,
  the peak resident set size. Without ``PATH`` (the baseline) the runtime is imported and the input made, but
  nothing is loaded or run. The peak is ``VmHWM`` (high-water mark of this process image) rather than
  ``ru_maxrss``: Linux carries ``ru_maxrss`` across fork + exec, so the child would report the parent's peak
  whenever the parent is the larger process.
* ``serve``: load ``PATH``, run ``--warmup`` calls, print ``PQV_READY``, then for each line ``<n>`` on stdin
  run one untimed call (caches are cold after the other workers ran) and ``n`` timed calls, and print one
  line ``PQV_TIMING {"wall_ms": [...], "cpu_ms": [...]}`` with the per-call wall-clock and process CPU times.
  EOF ends it. Between batches it blocks on stdin, using no CPU. ``KIND`` may also be ``eager``: ``PATH`` is
  then a ``state_dict`` file of the timm model ``--model`` (``--model-kwargs`` JSON), after the pruning
  structure ``--structure`` (JSON) is replayed and the token reduction ``--tokens`` (``TokenReduction.as_dict()``
  JSON) applied; with ``--tokens`` the ready line carries what the loaded model runs,
  ``PQV_READY {"tokens": {"method": ..., "r": ..., "tokens_per_block": [...]}}``.

:func:`memory_command` and :func:`serve_command` build these command lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pqv_lightning.export.formats import FORMATS
from pqv_lightning.export.loader import load_artifact, prepare_runtime, random_input

__all__ = [
    "PEAK_TAG",
    "READY_TAG",
    "SERVE_KINDS",
    "TIMING_TAG",
    "main",
    "memory_command",
    "read_peak",
    "serve_command",
    "serve_requests",
]

PEAK_TAG, READY_TAG, TIMING_TAG = "PQV_PEAK_RSS", "PQV_READY", "PQV_TIMING"
SERVE_KINDS = ("eager", *FORMATS)


def _base(mode: str, kind: str, path: str | None, shape: Sequence[int], threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pqv_lightning.export.probe",
        mode,
        kind,
        *([path] if path else []),
        "--shape",
        ",".join(str(int(s)) for s in shape),
        "--threads",
        str(threads),
    ]


def memory_command(
    kind: str, path: str | None, shape: Sequence[int], threads: int = 1, runs: int = 3, engine: str | None = None
) -> list[str]:
    """The command line of a ``memory`` probe (``path=None``: the baseline)."""
    return [
        *_base("memory", kind, path, shape, threads),
        "--runs",
        str(runs),
        *(["--engine", engine] if engine else []),
    ]


def serve_command(
    kind: str,
    path: str,
    shape: Sequence[int],
    threads: int = 1,
    warmup: int = 0,
    *,
    engine: str | None = None,
    ort_spinning: bool = False,
    model: str | None = None,
    model_kwargs: dict | None = None,
    structure: str | None = None,
    tokens: dict | None = None,
) -> list[str]:
    """The command line of a ``serve`` probe (``model``, ``model_kwargs``, ``structure``, ``tokens``: for
    ``eager``; ``tokens`` is a ``TokenReduction.as_dict()``)."""
    return [
        *_base("serve", kind, path, shape, threads),
        "--warmup",
        str(warmup),
        *(["--engine", engine] if engine else []),
        *(["--ort-spinning"] if ort_spinning else []),
        *(["--model", model, "--model-kwargs", json.dumps(model_kwargs or {})] if model else []),
        *(["--structure", structure] if structure else []),
        *(["--tokens", json.dumps(tokens)] if tokens is not None else []),
    ]


def read_peak(stdout: str) -> int | None:
    """The peak RSS a ``memory`` probe printed, None if it printed none."""
    for line in stdout.splitlines():
        if line.startswith(PEAK_TAG + " "):
            return int(json.loads(line.split(" ", 1)[1]))
    return None


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        hwm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")]
    if hwm:
        return hwm[0]
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bound_call(args: argparse.Namespace) -> tuple[Callable[[], Any], str]:
    """Load the artifact (or the eager model); return the zero-argument call on a random input and what the ready
    line reports about the loaded model (the token reduction of an eager model given ``--tokens``, else "")."""
    if args.kind == "eager":
        from pqv_lightning.export.eager import load_eager_model, module_artifact, random_tensor, set_torch_threads

        set_torch_threads(args.threads)
        module = load_eager_model(args.model, args.path, json.loads(args.model_kwargs), args.structure, args.tokens)
        ready = ""
        if args.tokens is not None:
            from pqv_lightning.tokens import token_summary

            ready = json.dumps({"tokens": token_summary(module, args.shape[-2:])})
        return module_artifact(module, "eager", args.engine).bind(random_tensor(args.shape)), ready
    loaded = load_artifact(args.path, args.kind, args.threads, args.engine, ort_spinning=args.ort_spinning)
    return loaded.bind(random_input(args.kind, args.shape)), ""


def _memory(args: argparse.Namespace) -> None:
    if args.path:
        run, _ = _bound_call(args)
        for _ in range(args.runs):
            run()
    else:
        prepare_runtime(args.kind, args.threads)
        random_input(args.kind, args.shape)
    print(f"{PEAK_TAG} {json.dumps(_peak_rss())}", flush=True)


def _serve(args: argparse.Namespace) -> None:
    run, ready = _bound_call(args)
    serve_requests(run, args.warmup, ready)


def serve_requests(run: Callable[[], Any], warmup: int, ready: str = "") -> None:
    """The timing worker's protocol: ``warmup`` calls, the ready line (``ready`` after the tag), then for each
    line ``n`` on stdin one untimed and ``n`` timed calls, answered with their wall-clock and CPU milliseconds."""
    for _ in range(warmup):
        run()
    print(f"{READY_TAG} {ready}".rstrip(), flush=True)
    for line in sys.stdin:
        runs = int(line)
        run()
        wall, cpu = [], []
        for _ in range(runs):
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        print(f"{TIMING_TAG} {json.dumps({'wall_ms': wall, 'cpu_ms': cpu})}", flush=True)


def _json_dict(text: str) -> dict:
    """A JSON object from the command line (argparse names the option and the value when this raises)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pqv_lightning.export.probe", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("memory", "serve"))
    parser.add_argument("kind", choices=SERVE_KINDS)
    parser.add_argument("path", nargs="?", default="", help="the artifact; memory mode without it: the baseline")
    parser.add_argument(
        "--shape", required=True, type=lambda s: [int(v) for v in s.split(",")], help="e.g. 1,3,224,224"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", default=None, help="torch.backends.quantized engine (torch.ao INT8 files)")
    parser.add_argument("--runs", type=int, default=3, help="memory: calls before the peak is read")
    parser.add_argument("--warmup", type=int, default=0, help="serve: untimed calls before PQV_READY")
    parser.add_argument("--ort-spinning", action="store_true", help="onnxruntime's default: idle workers spin")
    parser.add_argument("--model", default=None, help="eager: the timm model name")
    parser.add_argument("--model-kwargs", default="{}", help="eager: timm kwargs as JSON")
    parser.add_argument("--structure", default=None, help="eager: a JSON pruning structure to replay first")
    parser.add_argument(
        "--tokens", default=None, type=_json_dict, help="eager: token reduction (TokenReduction.as_dict() JSON)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.kind == "eager" and (args.mode != "serve" or not args.model or not args.path):
        parser.error("kind eager needs serve mode, --model and PATH (its state_dict file)")
    if args.tokens is not None and args.kind != "eager":
        parser.error("--tokens applies to kind eager only (a file carries its own token reduction)")
    if args.mode == "serve" and not args.path:
        parser.error("serve mode needs PATH")
    (_memory if args.mode == "memory" else _serve)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
