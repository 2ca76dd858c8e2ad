"""Smoothing and GPTQ change weights only: the INT8 files keep their graph, their delegation and their speed.

deit_small (random initialisation; ``--model`` for another timm name), 224 px, batch 1: the INT8 ``.pte`` (PT2E
static, XNNPACK) and the INT8 ONNX file (onnxruntime dynamic) of the model as it is, of its smoothed copy
(:func:`~pqv_lightning.quantization.smooth_outliers`) and, for the ``.pte``, of the smoothed copy with GPTQ + bias
correction on the XNNPACK grid (the export stage's ``weights``). Prints per file: nodes inside the XNNPACK delegate,
operators left outside, the file's agreement with the eager float model on the calibration-free check images, and
the median latency of the verified ``.pte`` files timed round-robin in one process (``--runs`` calls each after 5
warm-up calls).

    python benchmarks/smoothing_latency.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch
from _common import header, interleaved_latency

from pqv_lightning.export import export_artifacts, load_artifact
from pqv_lightning.quantization import round_weights, smooth_outliers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--no-onnx", action="store_true", help="the .pte files only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(header(args.threads), flush=True)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, *size, generator=generator) for _ in range(4)]
    check = [(torch.randn(8, *size, generator=generator), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="pqv-smoothing-latency-"))
    start = time.perf_counter()
    smoothed = smooth_outliers(model, calibration)
    print(f"smoothing: {smoothed.summary()} ({time.perf_counter() - start:.1f} s)", flush=True)
    rounded = round_weights(smoothed.model, "int8_pt2e:xnnpack", calibration)
    print(f"rounding: {rounded.summary()}", flush=True)
    example = check[0][0][:1]
    jobs = {
        "plain": (model, {}),
        "smoothed": (smoothed.model, {}),
        "smoothed + GPTQ": (smoothed.model, {"executorch-int8": rounded.model}),
    }
    files = {}
    for name, (source, weights) in jobs.items():
        artifacts = {"executorch": ["int8"]} if weights or args.no_onnx else {"executorch": ["int8"], "onnx": ["int8"]}
        records = export_artifacts(source, out / name.replace(" + ", "-"), artifacts, example, check,
                                   calibration=calibration, weights=weights)  # fmt: skip
        for record in records:
            label = f"{record.name} {name}"
            nodes, outside = record.extra.get("delegated_nodes", "-"), record.extra.get("outside_ops", "-")
            print(f"{label}: {record.status}, agreement {record.top1_agreement}, delegated nodes {nodes}, "
                  f"outside {outside}", flush=True)  # fmt: skip
            if record.status == "ok" and record.format == "executorch":  # timed: the XNNPACK programs
                files[label] = load_artifact(record.path, record.format, args.threads)
    x = torch.randn(1, *size)
    stats = interleaved_latency({k: a.bind(x) for k, a in files.items()}, warmup=5, runs=args.runs)
    print(f"\n{args.model}, batch 1, {args.threads} thread(s), median of {args.runs} round-robin calls\n")
    print("| file | ms |\n|---|---:|")
    for label, stat in stats.items():
        print(f"| {label} | {stat.median_ms:.2f} |")


if __name__ == "__main__":
    main()
