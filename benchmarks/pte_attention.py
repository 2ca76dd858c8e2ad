"""The ``.pte`` with fp32 vs fp16 attention: latency side by side and the operator profile of each, one run.

Run: ``python benchmarks/pte_attention.py [--model deit_small_patch16_224] [--precision int8_dynamic]
[--threads 2]``. Both files are exported from the same random-weight model (``pretrained=False``: speed and
delegation, not accuracy; the accuracy of fp16 attention is in each manifest's ``extra["attention_eager"]``), timed
in their own fresh processes in alternating rounds (quietest-round median), then profiled with ETDump.

XNNPACK runs fp16 products natively only where the CPU has fp16 arithmetic (ARMv8.2 phones, AVX512-FP16); on other
x86 CPUs it computes them in fp32, and the profile shows it (``F32`` in the operator names).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
from _common import Variant, cpu_info, header, interleaved_process_latency

from pqv_lightning.export import FP16_ATTENTION_PRECISIONS, export_pte
from pqv_lightning.measure.profile import operator_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", default="int8_dynamic", choices=FP16_ATTENTION_PRECISIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=8, help="operators shown per profile")
    args = parser.parse_args()

    print(header(args.threads))
    cpu = cpu_info()
    print(f"fp16 arithmetic on this CPU (avx512_fp16): {'yes' if 'avx512_fp16' in cpu.flags else 'no'}")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    shape = [1, 3, args.img_size, args.img_size]
    x = torch.randn(*shape)
    with tempfile.TemporaryDirectory(prefix="pqv-pte-attention-") as tmp:
        files = {}
        for attention in ("fp32", "fp16"):
            result = export_pte(model, x, args.precision, attention=attention)
            path = Path(tmp) / f"{args.precision}_{attention}_attention.pte"
            path.write_bytes(result.buffer)
            files[attention] = str(path)
            print(
                f"{attention} attention: {result.num_delegates} delegate(s), {result.delegated_nodes} nodes inside, "
                f"outside: {result.outside_ops or 'none'}"
            )
        variants = {f"pte {args.precision}, {a} attention": Variant("executorch", p) for a, p in files.items()}
        latency = interleaved_process_latency(variants, shape, args.threads, args.warmup, args.runs, args.rounds)
        print(f"\n{args.model} @ {args.img_size}px, batch 1, quietest-round median of {args.rounds} rounds")
        base = latency[next(iter(variants))].median_ms
        for label, stats in latency.items():
            print(f"  {label:40s} {stats.median_ms:7.2f} ms  (p90 {stats.p90_ms:6.2f})  {base / stats.median_ms:.2f}x")
        for attention, path in files.items():
            print(f"\noperator profile, {attention} attention ({args.threads} threads, ETDump, 10 passes):")
            for row in operator_profile(path, "executorch", x, top=args.top, threads=args.threads, passes=10):
                print(f"  {row.op:50s} {row.total_ms:6.2f} ms  {100 * row.share:5.1f}%  x{row.calls}")


if __name__ == "__main__":
    main()
