"""FP32 eager vs ExecuTorch/XNNPACK ``.pte`` (as it comes vs prepared), FP32 and INT8, one process.

Run: ``python benchmarks/executorch_delegation.py [--model deit_small_patch16_224] [--runs 30]``.
Threads: torch intra-op threads and the ExecuTorch XNNPACK threadpool are both fixed to ``--threads``
(the threadpool through ``executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool``; its
default is the number of cores). Weights are random (``pretrained=False``): this measures speed and
delegation, not accuracy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch

from pqv_lightning.executorch_lowering import export_pte


def cpu_info() -> tuple[str, bool]:
    model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    return model, "avx512_vnni" in flags.split()


def interleaved_latency_ms(
    fns: dict[str, Callable[[], object]], warmup: int, runs: int
) -> dict[str, tuple[float, float, float]]:
    """Median, 10th and 90th percentile (ms) per variant, timed round-robin so that load from other
    processes on the machine hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    stats = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=10)
        stats[name] = (statistics.median(values), q[0], q[-1])
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument(
        "--precisions", default="fp32,int8,int8_dynamic", help="comma list of fp32,int8,int8_dynamic,int4"
    )
    args = parser.parse_args()

    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    portable_lib._unsafe_reset_threadpool(args.threads)
    cpu, vnni = cpu_info()
    print(f"load average before start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(
        f"CPU: {cpu} | avx512_vnni: {vnni} | torch threads: {torch.get_num_threads()} | "
        f"ExecuTorch XNNPACK threadpool: {portable_lib._threadpool_get_thread_count()}"
    )
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, model {args.model} @ {args.img_size}px, "
        f"batch 1, median of {args.runs} round-robin runs after {args.warmup} warm-up, p10-p90"
    )

    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    x = torch.randn(1, 3, args.img_size, args.img_size)
    calib = [torch.randn(1, 3, args.img_size, args.img_size) for _ in range(args.calib_batches)]

    with torch.inference_mode():
        eager_ref = model(x)
    runtime = Runtime.get()
    fns: dict[str, Callable[[], object]] = {"fp32 eager": lambda: model(x)}
    rows: dict[str, str] = {}
    for precision in args.precisions.split(","):
        for prepare in (False, True):
            label = f"pte {precision} {'prepared' if prepare else 'as it comes'}"
            try:
                t0 = time.perf_counter()
                res = export_pte(model, x, precision, calibration=calib, prepare=prepare)
                export_s = time.perf_counter() - t0
            except Exception as err:
                rows[label] = f"export failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                continue
            loaded = runtime.load_program(res.buffer)
            method = loaded.load_method("forward")
            diff = (method.execute([x])[0] - eager_ref).abs().max().item()
            # the lambda holds the Program too: a Method outliving its Program crashes the runtime
            fns[label] = lambda m=method, p=loaded: m.execute([x])
            outside = ", ".join(f"{k}:{v}" for k, v in res.outside_ops.items()) or "none"
            rows[label] = (
                f"{diff:9.2e} {res.num_delegates:9d} {res.delegated_nodes:10d}  {outside}"
                f"  (export {export_s:.0f}s, {len(res.buffer) / 2**20:.1f} MiB)"
            )
            print(f"exported {label}", flush=True)

    with torch.inference_mode():
        stats = interleaved_latency_ms(fns, args.warmup, args.runs)
    eager = stats["fp32 eager"]
    print(
        f"\n{'variant':30s} {'median ms':>10s} {'p10-p90':>13s} {'vs eager':>9s}  "
        f"{'max|diff|':>9s} {'delegates':>9s} {'in XNNPACK':>10s}  outside ops"
    )
    print(f"{'fp32 eager':30s} {eager[0]:10.2f} {f'{eager[1]:.1f}-{eager[2]:.1f}':>13s} {1.0:8.2f}x")
    for label, row in rows.items():
        if label not in stats:
            print(f"{label:30s} {row}")
            continue
        lat = stats[label]
        print(f"{label:30s} {lat[0]:10.2f} {f'{lat[1]:.1f}-{lat[2]:.1f}':>13s} {eager[0] / lat[0]:8.2f}x  {row}")


if __name__ == "__main__":
    main()
