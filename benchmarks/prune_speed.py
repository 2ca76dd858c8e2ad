"""Cost of the whole Taylor prune step vs. the calibration passes it cannot avoid.

deit_base_patch16_224 (random init), Taylor importance over 10 calibration batches of 8 random 224px
images. Times, in one process with a fixed thread count:
  A = the same 10 forward+backward passes alone (eval mode, as prune runs them)
  B = pqv_lightning.pruning.prune(...) end to end (MAC counts, passes, graph build, ranking, surgery)
Target: B / A <= 1.3.

    python benchmarks/prune_speed.py [--threads 2] [--ratio 0.25] [--model deit_base_patch16_224]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import timm
import torch
import torch.nn.functional as F

from pqv_lightning.pruning import PruningSpec, prune


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    isa = [i for i in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f" {i}" in flags]
    return f"{name} ({', '.join(isa)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(args.batch_size, 3, 224, 224, generator=g),
            torch.randint(0, 1000, (args.batch_size,), generator=g),
        )
        for _ in range(args.batches)
    ]
    example = data[0][0][:1]

    baseline = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    for x, y in data:
        F.cross_entropy(baseline(x), y).backward()
    t_passes = time.perf_counter() - t0
    del baseline

    spec = PruningSpec(ratio=args.ratio, importance="taylor", calibration_batches=args.batches)
    t0 = time.perf_counter()
    result = prune(model, spec, example, calibration=data)
    t_prune = time.perf_counter() - t0

    print(f"cpu: {cpu_model()}; torch {torch.__version__}; threads: {torch.get_num_threads()}")
    print(f"model: {args.model}, Taylor, {args.batches} batches x {args.batch_size} x 3x224x224, ratio {args.ratio}")
    print(
        f"params {result.params_before / 1e6:.2f}M -> {result.params_after / 1e6:.2f}M, "
        f"MACs {result.macs_before / 1e9:.2f}G -> {result.macs_after / 1e9:.2f}G"
    )
    print(f"A  {args.batches} forward+backward passes alone: {t_passes:8.2f} s")
    print(f"B  whole prune step:                  {t_prune:8.2f} s")
    print(f"B / A = {t_prune / t_passes:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
