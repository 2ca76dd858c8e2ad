"""Headline latency: DeiT-Small at 224 px, batch 1, every runtime on the same fixed thread count.

Run: ``python benchmarks/latency_deit_small.py [--threads 2] [--runs 50] [--warmup 10] [--skip-pruned]
[--repeat] [--memory]``.

In one process, timed round-robin (one call of each variant per round, so load drift hits all alike):

* FP32 eager (timm, ``torch.inference_mode``);
* the PQV-Mobile pipeline as its authors run it: ``torch.ao`` ``quantize_dynamic`` on ``nn.Linear`` under
  the x86 engine -> ``torch.jit.script`` (``trace`` if scripting fails) -> ``optimize_for_mobile`` (when the
  torch build has XNNPACK) -> ``_save_for_lite_interpreter`` -> the lite interpreter;
* onnxruntime FP32 and onnxruntime's own ``quantize_dynamic`` with its default settings, i.e. what an ORT
  user writes: ``torch.onnx.export(model, (x,), f)``, ``quantize_dynamic(f, f_int8)``,
  ``InferenceSession(f_int8)`` (only the thread count is fixed, as for every runtime);
* every artifact that :func:`pqv_lightning.export.export_artifacts` writes and verifies, dense and after
  25 % structured pruning (:func:`pqv_lightning.pruning.prune`, L2, ratio 0.25).

Weights are random (``pretrained=False``) and the artifacts are verified on random images against the eager
model (top-1 agreement and logit difference): this measures speed, not accuracy.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from _common import LatencyStats, cpu_info, header, interleaved_latency, ratio
from torch import nn

from pqv_lightning.export import export_artifacts, optimize_for_mobile_status
from pqv_lightning.measure import make_runner
from pqv_lightning.pruning import PruningSpec, prune
from pqv_lightning.quantization import quantize

EAGER, PQV, ORT_FP32, ORT_INT8 = "fp32 eager", "PQV-Mobile pipeline (lite int8)", "ORT fp32", "ORT default int8"


def pqv_mobile_pipeline(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[str, str]:
    """Write the PQV-Mobile artifact to ``path``; return (how it was scripted, optimize_for_mobile status)."""
    from torch.ao.quantization import quantize_dynamic
    from torch.jit.mobile import _load_for_lite_interpreter

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
        how = "script"
        try:
            sm = torch.jit.script(qmodel)
            optimized = _optimize(sm)
            optimized._save_for_lite_interpreter(str(path))
            _load_for_lite_interpreter(str(path))
        except Exception as err:
            how = f"trace (script failed: {type(err).__name__})"
            with torch.no_grad():
                sm = torch.jit.trace(qmodel, x, check_trace=False)
            _optimize(sm)._save_for_lite_interpreter(str(path))
    status = optimize_for_mobile_status()
    return how, "applied" if status is None else f"skipped: {status}"


def _optimize(sm: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    if optimize_for_mobile_status() is not None:
        return sm
    from torch.utils.mobile_optimizer import optimize_for_mobile

    return optimize_for_mobile(sm)


def ort_default(model: nn.Module, x: torch.Tensor, work: Path) -> tuple[Path, Path, str]:
    """ONNX FP32 from ``torch.onnx.export`` defaults and onnxruntime ``quantize_dynamic`` defaults."""
    from onnxruntime.quantization import quantize_dynamic

    fp32, int8 = work / "ort_fp32.onnx", work / "ort_default_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (x,), str(fp32))
    note = "quantize_dynamic(defaults) on the exported file"
    try:
        quantize_dynamic(str(fp32), str(int8))
    except Exception as err:  # raw dynamo graphs may need ORT's own pre-processing first
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = work / "ort_fp32.pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_dynamic(str(pre), str(int8))
        note = f"quantize_dynamic(defaults) after quant_pre_process (direct call failed: {type(err).__name__})"
    return fp32, int8, note


def our_artifacts(model: nn.Module, x: torch.Tensor, work: Path, prefix: str, val, calib) -> list:
    q = quantize(model, "int8_dynamic:x86", x)
    return export_artifacts(
        model,
        work,
        ["torchscript", "executorch", "onnx"],
        x,
        val,
        quantized=[q],
        calibration=calib,
        executorch_precisions=("fp32", "int8", "int8_dynamic", "int4"),
        onnx_precisions=("fp32", "int8", "int8_qdq"),
        prefix=prefix,
    )


def _fmt(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--val-images", type=int, default=64, help="random images each artifact is verified on")
    parser.add_argument("--skip-pruned", action="store_true", help="leave out the 25%% pruned variants")
    parser.add_argument("--repeat", action="store_true", help="time everything twice; print agreement of medians")
    parser.add_argument("--model-kwargs", default="", help="extra timm kwargs, e.g. depth=2,embed_dim=64")
    args = parser.parse_args()
    for name in ("threads", "runs", "val_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.model_kwargs.split(",") if kv)}

    torch.manual_seed(0)
    print(header(args.threads))
    print(
        f"model {args.model} @ {args.img_size}px (pretrained=False, random weights), batch 1, "
        f"median and p90 of {args.runs} round-robin rounds after {args.warmup} warm-up calls"
    )
    print("artifacts verified on random images (random weights: agreement checks the runtime, not accuracy)")
    t_start = time.perf_counter()
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, **kwargs).eval()
    x = torch.randn(1, 3, args.img_size, args.img_size)
    val = [(torch.randn(args.val_images, 3, args.img_size, args.img_size), torch.randint(0, 1000, (args.val_images,)))]
    calib = [torch.randn(1, 3, args.img_size, args.img_size) for _ in range(8)]

    work = Path(tempfile.mkdtemp(prefix="pqv-latency-"))
    runners: dict[str, Callable[[], object]] = {EAGER: make_runner(model, "eager", x, args.threads)}
    notes: dict[str, str] = {}

    how, omf = pqv_mobile_pipeline(model, x, work / "pqv_mobile.ptl")
    runners[PQV] = make_runner(work / "pqv_mobile.ptl", "lite", x, args.threads, engine="x86")
    notes[PQV] = f"torch.jit {how}; optimize_for_mobile {omf}"
    fp32_onnx, int8_onnx, note = ort_default(model, x, work)
    runners[ORT_FP32] = make_runner(fp32_onnx, "onnx", x, args.threads)
    runners[ORT_INT8] = make_runner(int8_onnx, "onnx", x, args.threads)
    notes[ORT_INT8] = note
    print(f"baselines built ({time.perf_counter() - t_start:.0f}s)", flush=True)

    variants = [("dense", model)]
    if not args.skip_pruned:
        pruned = copy.deepcopy(model)
        res = prune(pruned, PruningSpec(ratio=0.25, importance="l2"), x)
        pruned.eval()
        print(
            f"pruned (l2, ratio 0.25): params {res.params_before / 1e6:.2f}M -> {res.params_after / 1e6:.2f}M, "
            f"MACs {res.macs_before / 1e9:.2f}G -> {res.macs_after / 1e9:.2f}G"
        )
        variants.append(("pruned25", pruned))

    records_by_label: dict[str, object] = {}
    for tag, net in variants:
        recs = our_artifacts(net, x, work, f"{tag}_", val, calib)
        for rec in recs:
            label = f"{tag} {rec.name}"
            if rec.status != "ok":
                notes[label] = f"{rec.status}: {(rec.reason or '')[:150]}"
                print(f"  {label}: {notes[label]}", flush=True)
                # a file that loads but misses the agreement threshold is timed too, marked unverified
                if not (rec.reason or "").startswith("verification failed") or rec.path is None:
                    continue
                label += " (unverified)"
            engine = rec.backend if rec.format == "torchscript" and rec.precision == "int8" else None
            runners[label] = make_runner(rec.path, rec.format, x, args.threads, engine=engine)
            records_by_label[label] = rec
        if tag == "pruned25":
            runners[f"{tag} eager fp32"] = make_runner(net, "eager", x, args.threads)
        print(f"{tag} artifacts exported and verified ({time.perf_counter() - t_start:.0f}s)", flush=True)

    print(f"load average before timing: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    rounds = []
    for n in range(2 if args.repeat else 1):
        rounds.append(interleaved_latency(runners, args.warmup, args.runs))
        print(f"timing pass {n + 1} done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    print(f"load average after timing: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    stats = rounds[0]
    report(stats, records_by_label, notes, args)
    if args.repeat:
        print("\nrepeat: median of pass 1 vs pass 2 (target: within 10%)")
        worst = 0.0
        for label in runners:
            a, b = rounds[0][label].median_ms, rounds[1][label].median_ms
            dev = abs(a - b) / min(a, b)
            worst = max(worst, dev)
            print(f"  {label:40s} {a:8.2f} {b:8.2f}  {dev * 100:5.1f}%")
        print(f"  largest disagreement {worst * 100:.1f}% -> {'PASS' if worst <= 0.10 else 'FAIL'} (<= 10%)")
    print(f"total time {time.perf_counter() - t_start:.0f}s; files in {work}")


def _fastest(stats: dict[str, LatencyStats], labels: list[str]) -> tuple[str | None, LatencyStats | None]:
    best = min(labels, key=lambda lab: stats[lab].median_ms, default=None)
    return best, (stats[best] if best else None)


def report(stats: dict[str, LatencyStats], records: dict, notes: dict[str, str], args) -> None:
    eager, pqv, ort8 = stats[EAGER], stats[PQV], stats[ORT_INT8]
    print(
        f"\n{'variant':40s} {'median ms':>9s} {'p90 ms':>8s} {'vs eager':>8s} {'vs ORT int8':>11s} "
        f"{'vs PQV':>7s} {'agree':>6s} {'max|diff|':>9s} {'MiB':>6s}"
    )
    for label, s in stats.items():
        rec = records.get(label)
        agree = f"{rec.top1_agreement:.3f}" if rec is not None and rec.top1_agreement is not None else "-"
        diff = f"{rec.max_abs_logit_diff:.2e}" if rec is not None and rec.max_abs_logit_diff is not None else "-"
        size = f"{rec.size_bytes / 2**20:.1f}" if rec is not None and rec.size_bytes else "-"
        print(
            f"{label:40s} {s.median_ms:9.2f} {s.p90_ms:8.2f} {_fmt(ratio(eager, s)):>8s} "
            f"{_fmt(ratio(ort8, s)):>11s} {_fmt(ratio(pqv, s)):>7s} {agree:>6s} {diff:>9s} {size:>6s}"
        )
    for label, note in notes.items():
        print(f"  note {label}: {note}")

    def ours(tag: str, verified: bool, precision: str | None = None, fmt: str | None = None) -> list[str]:
        return [
            lab
            for lab, rec in records.items()
            if lab.startswith(f"{tag} ")
            and (rec.status == "ok" or not verified)
            and (precision is None or rec.precision == precision)
            and (fmt is None or rec.format == fmt)
        ]

    vnni = cpu_info().vnni
    for verified in (True, False):
        int8_label, int8 = _fastest(stats, ours("dense", verified, "int8"))
        pte_label, pte = _fastest(stats, ours("dense", verified, fmt="executorch"))
        pr_label, pr = _fastest(stats, ours("pruned25", verified, "int8"))
        rows = [
            (f"fastest INT8 ({int8_label}) vs ORT default dynamic", ratio(ort8, int8), 1.2),
            (f"fastest INT8 ({int8_label}) vs PQV-Mobile pipeline", ratio(pqv, int8), 1.8),
            (f"fastest INT8 ({int8_label}) vs FP32 eager (VNNI: {vnni})", ratio(eager, int8), 3.5),
            (f"fastest .pte ({pte_label}) vs FP32 eager", ratio(eager, pte), 2.5),
        ]
        if not args.skip_pruned:
            rows.append((f"25% pruned fastest INT8 ({pr_label}) vs dense FP32 eager", ratio(eager, pr), 4.5))
        pool = "verified artifacts only" if verified else "every loadable artifact, verified or not"
        print(f"\ntargets over {pool} (threads={args.threads}, ratio of medians):")
        for text, value, target in rows:
            verdict = "n/a" if value is None else ("MET" if value >= target else "NOT MET")
            print(f"  {text:86s} {_fmt(value):>7s}  target >= {target}x  {verdict}")
    if not vnni:
        print("  (this CPU has no avx512_vnni: the 3.5x INT8 target assumes it)")


if __name__ == "__main__":
    sys.exit(main())
