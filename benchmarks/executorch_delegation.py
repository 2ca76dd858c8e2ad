"""FP32 eager vs ExecuTorch/XNNPACK ``.pte`` (as it comes vs prepared), FP32 and INT8, one process.

Run: ``python benchmarks/executorch_delegation.py [--model deit_small_patch16_224] [--runs 30]``.
Threads: torch intra-op threads and the ExecuTorch XNNPACK threadpool are both fixed to ``--threads``
(the threadpool through ``executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool``; its
default is the number of cores); see ``benchmarks/_common.py``. Weights are random (``pretrained=False``):
this measures speed and delegation, not accuracy.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import timm
import torch
from _common import header, interleaved_latency

from pqv_lightning.export import export_pte


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

    from executorch.runtime import Runtime

    torch.manual_seed(0)
    print(header(args.threads))
    print(
        f"model {args.model} @ {args.img_size}px, batch 1, median and p90 of {args.runs} round-robin runs "
        f"after {args.warmup} warm-up"
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

    stats = interleaved_latency(fns, args.warmup, args.runs)
    eager = stats["fp32 eager"]
    print(
        f"\n{'variant':30s} {'median ms':>10s} {'p90 ms':>13s} {'vs eager':>9s}  "
        f"{'max|diff|':>9s} {'delegates':>9s} {'in XNNPACK':>10s}  outside ops"
    )
    print(f"{'fp32 eager':30s} {eager.median_ms:10.2f} {eager.p90_ms:13.2f} {1.0:8.2f}x")
    for label, row in rows.items():
        if label not in stats:
            print(f"{label:30s} {row}")
            continue
        lat = stats[label]
        ratio = eager.median_ms / lat.median_ms
        print(f"{label:30s} {lat.median_ms:10.2f} {lat.p90_ms:13.2f} {ratio:8.2f}x  {row}")


if __name__ == "__main__":
    main()
