"""What a token-merging ``.pte`` spends outside its XNNPACK delegates: the matching's share of the operator time.

Run: ``python benchmarks/tome_pte_profile.py [--model deit_small_patch16_224] [--r 13] [--precision int8_dynamic]
[--threads 2] [--dense]``. One random-weight model (``pretrained=False``: delegation and time, not accuracy) with
ToMe merging (``r`` tokens a block) is exported to a ``.pte`` (the matrix form of :mod:`pqv_lightning.tokens.slots`:
only the matching stays outside the delegates), checked against the eager merging model, and profiled with ETDump
(``passes`` forwards after a warm-up): XNNPACK reports each delegated operator, the portable kernels (what runs
outside) report ``native_call_<op>``. Printed: the operators left outside, their share of the summed operator time,
each of them, and the largest delegated ones. ``--dense`` also profiles the same network without merging (r=0) and
prints the ratio of the summed operator times. One run; the CPU, ISA and load are printed first.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import timm
import torch
from _common import header

from pqv_lightning.export import export_pte, run_pte
from pqv_lightning.measure.profile import operator_profile
from pqv_lightning.tokens import TokenReduction, apply_token_reduction, tokens_per_block

_PORTABLE = "native_call_"


def _export(model: torch.nn.Module, x: torch.Tensor, precision: str, path: Path) -> None:
    start = time.perf_counter()
    result = export_pte(model, x, precision)
    path.write_bytes(result.buffer)
    with torch.no_grad():
        diff = (run_pte(result.buffer, x) - model(x)).abs().max().item()
    print(
        f"  exported in {time.perf_counter() - start:.0f} s: {result.num_delegates} delegate(s), "
        f"{result.delegated_nodes} nodes inside; outside: {result.outside_ops or 'none'}; "
        f"max |runtime - eager| {diff:.3g}"
    )


def _profile(path: Path, x: torch.Tensor, threads: int, passes: int, top: int) -> float:
    rows = operator_profile(str(path), "executorch", x, top=10_000, threads=threads, passes=passes)
    total = sum(row.total_ms for row in rows)
    outside = [row for row in rows if row.op.startswith(_PORTABLE)]
    outside_ms = sum(row.total_ms for row in outside)
    print(
        f"  summed operator time {total:.2f} ms per forward; outside the delegates {outside_ms:.3f} ms = "
        f"{100 * outside_ms / total:.2f}% ({len(outside)} operator kinds)"
    )
    for row in outside:
        print(f"    {row.op:48s} {row.total_ms:7.3f} ms  {100 * row.share:5.2f}%  x{row.calls}")
    print(f"  largest delegated operators (top {top}):")
    for row in [row for row in rows if not row.op.startswith(_PORTABLE)][:top]:
        print(f"    {row.op:48s} {row.total_ms:7.3f} ms  {100 * row.share:5.2f}%  x{row.calls}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--method", default="merge", choices=("merge", "prune"))
    parser.add_argument("--precision", default="int8_dynamic", choices=("fp32", "int8_dynamic", "int4"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--top", type=int, default=6, help="delegated operators shown")
    parser.add_argument("--dense", action="store_true", help="also profile the network without merging")
    args = parser.parse_args()

    print(header(args.threads))
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    x = torch.randn(1, 3, args.img_size, args.img_size)
    reduced = apply_token_reduction(copy.deepcopy(model), TokenReduction(args.method, r=args.r))
    print(
        f"{args.model} @ {args.img_size}px, batch 1, {args.precision} .pte, {args.method} r={args.r}: tokens per "
        f"block {tokens_per_block(reduced)}"
    )
    totals = {}
    with tempfile.TemporaryDirectory(prefix="pqv-tome-pte-") as tmp:
        variants = {f"r={args.r}": reduced} | ({"r=0 (no merging)": model} if args.dense else {})
        for label, network in variants.items():
            print(f"\n{label}:")
            path = Path(tmp) / f"{label.split()[0]}.pte"
            _export(network, x, args.precision, path)
            print(f"  operator profile ({args.threads} threads, ETDump, {args.passes} passes):")
            totals[label] = _profile(path, x, args.threads, args.passes, args.top)
    if args.dense:
        dense, merged = totals["r=0 (no merging)"], totals[f"r={args.r}"]
        print(f"\nsummed operator time, no merging / r={args.r}: {dense / merged:.2f}x")


if __name__ == "__main__":
    main()
