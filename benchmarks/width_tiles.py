"""Which channel multiples each int8 kernel runs fastest, and what ``round_to="auto"`` buys at equal MACs.

Run: ``python benchmarks/width_tiles.py [--threads 2] [--quick]``. One run, CPU and ISA printed.

Part 1, the tiles: a deit_small MLP block (197 tokens, 384 -> ``W`` -> 384, int8 linear layers, GELU between) for
hidden widths ``W`` from 1152 to 1216 (multiples of 1 to 64 among them), in three kernels: XNNPACK (ExecuTorch
``.pte`` ``int8_dynamic``), onnxruntime (dynamic INT8, MLAS) and oneDNN (torch.ao dynamic INT8 linear on the
``onednn`` engine, the library behind the AOTInductor ``.pt2``). Latency per MAC is compared between widths that
are a multiple of ``m`` and all widths; the preferred multiple of a kernel is the smallest ``m`` past which a larger
one gains under 2%.

Part 2, equal MACs: deit_small pruned with ``round_to=None`` at ``--ratio``, and with ``round_to="auto"`` (the
multiple :func:`pqv_lightning.export.widths.kernel_multiple` gives the target) to the same MACs, each exported and
timed in its own fresh process, alternating rounds (quietest-round median). Random weights (``pretrained=False``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from _common import Variant, header, interleaved_latency, interleaved_process_latency
from torch import nn

from pqv_lightning.export import export_artifacts, export_pte
from pqv_lightning.export.executorch import load_program
from pqv_lightning.export.widths import KERNEL_MULTIPLE, kernel_multiple
from pqv_lightning.pruning import PruningSpec, count_macs_params, prune

TOKENS, IN_FEATURES = 197, 384
MULTIPLES = (4, 8, 16, 32, 64)


class _Mlp(nn.Sequential):
    def __init__(self, width: int) -> None:
        super().__init__(nn.Linear(IN_FEATURES, width), nn.GELU(), nn.Linear(width, IN_FEATURES))
        self.width = width


def _xnnpack(layer: nn.Module, x: torch.Tensor):
    program = load_program(export_pte(layer, x, "int8_dynamic", prepare=False).buffer)
    return lambda: program([x])


def _onnxruntime(layer: nn.Module, x: torch.Tensor, tmp: Path, threads: int):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pqv_lightning.export.onnx import ort_session

    fp32, int8 = tmp / f"mlp{layer.width}.onnx", tmp / f"mlp{layer.width}_int8.onnx"
    torch.onnx.export(layer, (x,), str(fp32), dynamo=False, input_names=["x"])
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    session = ort_session(str(int8), threads)
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def _onednn(layer: nn.Module, x: torch.Tensor):
    torch.backends.quantized.engine = "onednn"
    quantized = torch.ao.quantization.quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8)
    return lambda: quantized(x)


OFFSETS = (0, 1, 3, 4, 7, 8, 12, 15, 16, 17, 20, 24, 28, 31, 32, 33, 40, 47, 48, 52, 56, 60, 63, 64)


def tiles(threads: int, base: int, runs: int) -> dict[str, int]:
    """Print latency per MAC by width multiple for each kernel; return each kernel's measured preferred multiple."""
    x = torch.randn(TOKENS, IN_FEATURES)
    widths = [base + offset for offset in OFFSETS]
    found = {}
    with tempfile.TemporaryDirectory(prefix="pqv-tiles-") as tmp:
        for kernel in ("xnnpack", "onnxruntime", "onednn"):
            calls = {}
            for width in widths:
                torch.manual_seed(width)
                layer = _Mlp(width).eval()
                if kernel == "xnnpack":
                    calls[width] = _xnnpack(layer, x)
                elif kernel == "onnxruntime":
                    calls[width] = _onnxruntime(layer, x, Path(tmp), threads)
                else:
                    calls[width] = _onednn(layer, x)
            with torch.inference_mode():
                stats = interleaved_latency({str(w): fn for w, fn in calls.items()}, warmup=10, runs=runs)
            per_mac = {w: stats[str(w)].median_ms / (2 * TOKENS * IN_FEATURES * w) * 1e9 for w in widths}
            print(f"\n{kernel}: median ms per call by output width (ps per MAC in brackets)")
            print("  " + "  ".join(f"{w}:{stats[str(w)].median_ms:.3f}({per_mac[w]:.2f})" for w in widths))
            mean_all = statistics.fmean(per_mac.values())
            gains = {m: 1 - statistics.fmean(v for w, v in per_mac.items() if w % m == 0) / mean_all for m in MULTIPLES}
            print("  per-MAC gain of widths that are multiples of m over all widths: "
                  + ", ".join(f"m={m}: {100 * g:+.1f}%" for m, g in gains.items()))  # fmt: skip
            preferred = next(m for m in MULTIPLES if all(gains[n] - gains[m] < 0.02 for n in MULTIPLES if n > m))
            found[kernel] = preferred
            print(f"  measured preferred multiple: {preferred} (kernel_multiple table: "
                  f"{KERNEL_MULTIPLE[kernel]})")  # fmt: skip
    return found


def equal_macs(threads: int, ratio: float, target: str, runs: int, rounds: int) -> None:
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    plain, rounded = copy.deepcopy(dense), copy.deepcopy(dense)
    prune(plain, PruningSpec(ratio=ratio, bottleneck=True), x)
    macs = count_macs_params(plain, x)[0]
    multiple = kernel_multiple(target)
    prune(rounded, PruningSpec(ratio=None, target_macs=macs, bottleneck=True, round_to=multiple), x)
    fmt, precision = target.split("-", 1)
    models = {"round_to=None": plain, f"round_to='auto' ({multiple})": rounded}
    with tempfile.TemporaryDirectory(prefix="pqv-equal-macs-") as tmp:
        variants = {}
        for label, model in models.items():
            widths = sorted({m.out_features for m in model.modules() if isinstance(m, nn.Linear)})
            print(f"  {label}: {count_macs_params(model, x)[0] / 1e9:.3f} GMAC, linear output widths {widths}")
            out = Path(tmp) / label.split("=")[1][:4].strip("'( ")
            records = export_artifacts(
                model, out, [fmt], x, [(x, torch.tensor([0]))], calibration=[x],
                **{f"{f}_precisions": [precision] if f == fmt else [] for f in ("executorch", "onnx", "aoti")},
            )  # fmt: skip
            record = next(r for r in records if r.name == target)
            if record.status != "ok":
                raise RuntimeError(f"{label}: {record.reason}")
            variants[label] = Variant(fmt, record.path)
        latency = interleaved_process_latency(variants, list(x.shape), threads, 5, runs, rounds)
    base = latency["round_to=None"].median_ms
    for label, stats in latency.items():
        speedup = base / stats.median_ms
        print(f"  {target} {label:28s} {stats.median_ms:7.2f} ms (p90 {stats.p90_ms:6.2f})  {speedup:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer widths and runs (about 4 minutes)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--targets", default="executorch-int8_dynamic,onnx-int8")
    parser.add_argument("--skip-tiles", action="store_true", help="part 2 only")
    args = parser.parse_args()
    print(header(args.threads))
    if not args.skip_tiles:
        tiles(args.threads, base=1152, runs=80 if args.quick else 200)
    print(f"\ndeit_small pruned at ratio {args.ratio} (bottleneck) vs the same MACs with round_to='auto', batch 1:")
    for target in args.targets.split(","):
        equal_macs(args.threads, args.ratio, target, runs=40 if args.quick else 80, rounds=8)


if __name__ == "__main__":
    main()
