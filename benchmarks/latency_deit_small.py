"""Headline latency: DeiT-Small at 224 px, batch 1, every runtime on the same fixed thread count.

Run: ``python benchmarks/latency_deit_small.py [--threads 2] [--runs 144] [--rounds 24] [--processes 6]
[--warmup 5] [--skip-pruned] [--repeat] [--ort-spinning on|off] [--quick] [--tokens 0 8 13 16]``.

``--quick`` (about 8 minutes on 2 cores instead of about 30): only the files that can be the fastest of their kind
(INT8 ExecuTorch static and dynamic, ONNX INT8, AOTInductor INT8 and FP32, OpenVINO INT8 IR where the extra is
installed) beside the peers, verified on 32 images, timed in 8 rounds over 2 processes per variant; the ratios it
prints are the full run's, with more spread.

Every variant is loaded in its own Python process (only its runtime imported, threads fixed) and timed in
``--rounds`` short alternating rounds (the starting variant rotates; idle workers block, using no CPU), so that
the machine's drift hits all variants alike and no runtime's thread pool can slow another one down; the rounds
are split over ``--processes`` successive fresh processes per variant, because some runtimes run the same file
at a different speed in different processes. The headline median is the median of each variant's quietest
round: on a shared VM the speed of the same process drifts by 30-40% for tens of seconds at a time, and the
pooled median (also printed) moves with the share of slow rounds, the quietest round's median does not. The
table also gives the median process CPU time per call (all threads). ``--repeat`` loads and times everything
twice and prints how far the two passes' medians differ (target: within 10%). Variants:

* FP32 eager (timm, ``torch.inference_mode``);
* the PQV-Mobile pipeline as its authors run it: ``torch.ao`` ``quantize_dynamic`` on ``nn.Linear`` under
  the x86 engine -> ``torch.jit.script`` (``trace`` if scripting fails) -> ``optimize_for_mobile`` (when the
  torch build has XNNPACK) -> ``_save_for_lite_interpreter`` -> the lite interpreter;
* onnxruntime FP32 and onnxruntime's own ``quantize_dynamic`` with its default settings, i.e. what an ORT
  user writes: ``torch.onnx.export(model, (x,), f)``, ``quantize_dynamic(f, f_int8)``,
  ``InferenceSession(f_int8)`` (only the thread count is fixed, as for every runtime; onnxruntime's own
  session defaults otherwise, including spinning idle workers unless ``--ort-spinning off``);
* OpenVINO with its defaults on that FP32 ONNX file (``Core().compile_model(f, "CPU")``, thread count fixed),
  when the optional ``openvino`` package is installed (``pip install .[benchmarks]``; skipped with a note where not);
* every artifact that :func:`pqv_lightning.export.export_artifacts` writes and verifies, dense and after
  25 % structured pruning (:func:`pqv_lightning.pruning.prune`, L2, ratio 0.25), AOTInductor packages included;
* with ``--tokens R [R ...]``, for each ``r > 0`` and each network (dense, 25 % pruned), a copy merging ``r`` tokens
  a block (ToMe, :func:`pqv_lightning.tokens.apply_token_reduction`): its FP32 eager model (the timing process
  rebuilds the merging model: structure, then reduction) and its INT8 files (``.pte`` static and dynamic, ONNX,
  AOTInductor), each verified against the eager merging model; for the pruned network, onnxruntime's default INT8
  of the pruned network without merging is timed too. A section per ``r`` gives each of them beside FP32 eager of
  the dense network, ORT default INT8 of the same network without merging and the same file without merging, the
  tokens entering each block (as the file's manifest record or the eager worker reports it), and the share of each
  merging ``.pte``'s operator time spent outside its XNNPACK delegates (the matching; ETDump, ``--profile-passes``).
  Every variant's worker stays loaded through a process set: ``--quick --tokens 0 8 13 16`` times 47 variants, 35 of
  them in torch-based workers of 0.3-0.45 GB proportional set size each (measured on a 0.2M-parameter model; the
  onnxruntime ones about 0.03 GB), so it needs about 15 GB of free memory; fewer ``r`` values need less.

Weights are random (``pretrained=False``) and the artifacts are verified on random images against the eager
model (top-1 agreement and logit difference); the classifier head is ridge-fitted to those images first so
that top-1 agreement is not decided by near-ties (see :func:`fit_head`). This measures speed, not accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from _common import (
    ProcessLatency,
    Variant,
    busy_cores,
    cpu_info,
    header,
    interleaved_process_latency,
    load_average,
    openvino_missing,
)
from torch import nn

from pqv_lightning.export import export_artifacts, optimize_for_mobile_status
from pqv_lightning.pruning import PruningSpec, prune
from pqv_lightning.quantization import quantize
from pqv_lightning.tokens import TokenReduction, apply_token_reduction, check_token_reduction, tokens_per_block

EAGER, PQV, ORT_FP32, ORT_INT8 = "fp32 eager", "PQV-Mobile pipeline (lite int8)", "ORT fp32", "ORT default int8"
OPENVINO = "OpenVINO default (fp32 onnx)"
PEERS = (PQV, ORT_INT8, OPENVINO)
#: Our files ({format: precisions}): all of them, or the candidates for the fastest (``--quick``).
FULL = {"torchscript": ["fp32", "quantized"], "executorch": ["fp32", "int8", "int8_dynamic", "int4"],
        "onnx": ["fp32", "int8", "int8_qdq"], "aoti": ["fp32", "int8"]}  # fmt: skip
QUICK = {"executorch": ["int8", "int8_dynamic"], "onnx": ["int8"], "aoti": ["fp32", "int8"]}
if openvino_missing() is None:  # our OpenVINO IRs (the openvino extra), timed like the OpenVINO peer
    FULL = {**FULL, "openvino": ["fp32", "int8"]}
    QUICK = {**QUICK, "openvino": ["int8"]}
#: The files of each token-merging copy (``--tokens``): the INT8 candidates for the fastest, as in ``--quick``.
MERGED = {"executorch": ["int8", "int8_dynamic"], "onnx": ["int8"], "aoti": ["int8"]}
#: ExecuTorch's portable kernels (what runs outside the XNNPACK delegates) in an ETDump operator profile.
PORTABLE = "native_call_"


@dataclass(frozen=True)
class MergedNet:
    """One network (``tag``: dense or pruned25) merging ``r`` tokens a block: its timed labels (eager FP32 first,
    then its files) and the tokens entering each block in this process."""

    r: int
    tag: str
    name: str
    labels: list[str]
    tokens: list[int]


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


def ort_default(model: nn.Module, x: torch.Tensor, work: Path, prefix: str = "") -> tuple[Path, Path, str]:
    """ONNX FP32 from ``torch.onnx.export`` defaults and onnxruntime ``quantize_dynamic`` defaults."""
    from onnxruntime.quantization import quantize_dynamic

    fp32, int8 = work / f"{prefix}ort_fp32.onnx", work / f"{prefix}ort_default_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (x,), str(fp32))
    note = "quantize_dynamic(defaults) on the exported file"
    try:
        quantize_dynamic(str(fp32), str(int8))
    except Exception as err:  # raw dynamo graphs may need ORT's own pre-processing first
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = work / f"{prefix}ort_fp32.pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_dynamic(str(pre), str(int8))
        note = f"quantize_dynamic(defaults) after quant_pre_process (direct call failed: {type(err).__name__})"
    return fp32, int8, note


def fit_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0) -> str:
    """Refit the linear classifier of a random-weight timm model by ridge regression of its pre-logits on
    ``images`` onto one-hot ``labels``; returns what was done (or why not).

    Random weights give near-tied logits (top-1 gap about 0.15 against about 0.05 of int8 noise), so top-1
    agreement between an int8 runtime and eager is a coin toss per image (0.94-0.98 for the same ``.pte``
    on two sets of random images). With the fitted head every verification image has a clear top-1 (gap
    about 1), so agreement checks the runtime as it would on a trained model. Speed is unchanged.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear) or getattr(model, "head_dist", None) is not None:
        return f"not fitted (classifier is {type(head).__name__}, not one nn.Linear head)"
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(images), pre_logits=True).double()
        targets = torch.nn.functional.one_hot(labels, head.out_features).double()
        mean_f, mean_t = feats.mean(0), targets.mean(0)
        x = feats - mean_f
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        weight = torch.linalg.solve(gram, x.T @ (targets - mean_t)).T
        head.weight.copy_(weight.float())
        if head.bias is not None:
            head.bias.copy_((mean_t - weight @ mean_f).float())
        top2 = model(images).topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).median().item()
    return f"ridge-fitted on the {len(images)} verification images (median top-1 logit gap {gap:.2f})"


def our_artifacts(
    model: nn.Module, x: torch.Tensor, work: Path, prefix: str, val, calib, quick: bool, merged: bool = False
) -> list:
    """Export and verify our files of ``model``: :data:`MERGED` for a token-merging copy, else :data:`QUICK` or
    :data:`FULL` (the latter with the torch.ao dynamic INT8 variant for TorchScript)."""
    artifacts = MERGED if merged else QUICK if quick else FULL
    quantized = [] if quick or merged else [quantize(model, "int8_dynamic:x86", x)]
    return export_artifacts(model, work, artifacts, x, val, quantized=quantized, calibration=calib, prefix=prefix)


def _fmt(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _ratio(reference: ProcessLatency | None, candidate: ProcessLatency | None) -> float | None:
    if reference is None or candidate is None:
        return None
    return reference.median_ms / candidate.median_ms


def _save_state(model: nn.Module, path: Path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls after loading each variant")
    parser.add_argument("--processes", type=int, default=6, help="fresh processes per variant per pass")
    parser.add_argument("--runs", type=int, default=144, help="timed calls per variant per pass, over all rounds")
    parser.add_argument("--rounds", type=int, default=24, help="alternating rounds per pass (one batch per variant)")
    parser.add_argument("--val-images", type=int, default=64, help="random images each artifact is verified on")
    parser.add_argument(
        "--random-head", action="store_true",
        help="keep the random classifier (near-tied logits: int8 top-1 agreement becomes chance, see fit_head)",
    )  # fmt: skip
    parser.add_argument("--skip-pruned", action="store_true", help="leave out the 25%% pruned variants")
    parser.add_argument("--repeat", action="store_true", help="time everything twice; print agreement of medians")
    parser.add_argument(
        "--ort-spinning", choices=("on", "off"), default="on",
        help="onnxruntime idle-worker spinning for every ORT session (on = onnxruntime's default)",
    )  # fmt: skip
    parser.add_argument(
        "--omp-wait-policy", choices=("default", "passive"), default="default",
        help="OMP_WAIT_POLICY of every timing process (torch's OpenMP pool; passive = idle workers sleep at once)",
    )  # fmt: skip
    parser.add_argument("--work-dir", default=None, help="where artifacts go (default: a new temporary folder)")
    parser.add_argument("--model-kwargs", default="", help="extra timm kwargs, e.g. depth=2,embed_dim=64")
    parser.add_argument(
        "--quick", action="store_true",
        help="the fastest candidates only, 32 verification images, 8 rounds over 2 processes (about 8 minutes)",
    )  # fmt: skip
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[0], metavar="R",
        help="ToMe merging: for each R > 0, every network also merging R tokens a block (eager FP32 and INT8 files); "
        "0 = without merging (always timed)",
    )  # fmt: skip
    parser.add_argument(
        "--profile-passes", type=int, default=10,
        help="ETDump passes of each merging .pte's operator profile (the matching's share); 0: no profile",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        for name, value in (("processes", 2), ("rounds", 8), ("runs", 48), ("val_images", 32), ("warmup", 3)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    for name in ("threads", "runs", "rounds", "processes", "val_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if min(args.tokens) < 0:
        parser.error(f"--tokens must be ints >= 0, got {args.tokens}")
    if args.profile_passes < 0:
        parser.error(f"--profile-passes must be >= 0, got {args.profile_passes}")
    merging = sorted({r for r in args.tokens if r > 0})
    if args.processes > args.rounds:
        parser.error(f"--processes must be <= --rounds ({args.rounds}), got {args.processes}")
    try:
        kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.model_kwargs.split(",") if kv)}
    except ValueError:
        parser.error(f"--model-kwargs must be name=int pairs separated by commas, got {args.model_kwargs!r}")

    torch.manual_seed(0)
    print(header(args.threads))
    per_round = -(-args.runs // args.rounds)
    print(
        f"model {args.model} @ {args.img_size}px (pretrained=False, random weights), batch 1; each variant in its "
        f"own process ({args.warmup} warm-up calls), {args.processes} processes per variant per pass sharing "
        f"{args.rounds} alternating rounds x (1 untimed + {per_round} timed calls); "
        f"onnxruntime spinning {args.ort_spinning}, OMP_WAIT_POLICY {args.omp_wait_policy}"
    )
    print(
        "artifacts verified on random images against eager (random weights, classifier head ridge-fitted to those "
        "images unless --random-head: agreement checks the runtime, not accuracy)"
    )
    t_start = time.perf_counter()
    model_kwargs = {"img_size": args.img_size, **kwargs}
    model = timm.create_model(args.model, pretrained=False, **model_kwargs).eval()
    for r in merging:  # refused here (family, pooling), before any export
        check_token_reduction(model, TokenReduction("merge", r=r))
    x = torch.randn(1, 3, args.img_size, args.img_size)
    val_images = torch.randn(args.val_images, 3, args.img_size, args.img_size)
    val = [(val_images, torch.randint(0, model.num_classes, (args.val_images,)))]
    calib = [torch.randn(1, 3, args.img_size, args.img_size) for _ in range(8)]

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="pqv-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    spinning = args.ort_spinning == "on"

    def eager(net: nn.Module, tag: str, structure: dict | None = None, tokens: dict | None = None) -> Variant:
        structure_path = None
        if structure is not None:
            structure_path = str(work / f"{tag}_structure.json")
            Path(structure_path).write_text(json.dumps(structure))
        state = _save_state(net, work / f"{tag}_state.pt")
        return Variant(
            "eager", state, model=args.model, model_kwargs=model_kwargs, structure=structure_path, tokens=tokens
        )

    notes: dict[str, str] = {}
    if not args.random_head:
        notes["classifier head"] = fit_head(model, val_images, val[0][1])
    variants: dict[str, Variant] = {EAGER: eager(model, "dense")}

    how, omf = pqv_mobile_pipeline(model, x, work / "pqv_mobile.ptl")
    variants[PQV] = Variant("lite", str(work / "pqv_mobile.ptl"), engine="x86")
    notes[PQV] = f"torch.jit {how}; optimize_for_mobile {omf}"
    fp32_onnx, int8_onnx, note = ort_default(model, x, work)
    variants[ORT_FP32] = Variant("onnx", str(fp32_onnx), ort_spinning=spinning)
    variants[ORT_INT8] = Variant("onnx", str(int8_onnx), ort_spinning=spinning)
    notes[ORT_INT8] = note
    missing = openvino_missing()
    if missing is None:
        import openvino as ov

        variants[OPENVINO] = Variant("openvino", str(fp32_onnx))
        hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
        notes[OPENVINO] = f"OpenVINO {ov.__version__}, CPU plugin defaults (inference precision {hint})"
    else:
        notes[OPENVINO] = f"not run: {missing}"
    print(f"baselines built ({time.perf_counter() - t_start:.0f}s)", flush=True)

    nets = [("dense", model, None)]
    if not args.skip_pruned:
        pruned = copy.deepcopy(model)
        res = prune(pruned, PruningSpec(ratio=0.25, importance="l2"), x)
        pruned.eval()
        if not args.random_head:
            notes["pruned25 classifier head"] = fit_head(pruned, val_images, val[0][1])
        print(
            f"pruned (l2, ratio 0.25): params {res.params_before / 1e6:.2f}M -> {res.params_after / 1e6:.2f}M, "
            f"MACs {res.macs_before / 1e9:.2f}G -> {res.macs_after / 1e9:.2f}G"
        )
        nets.append(("pruned25", pruned, res.structure))

    records_by_label: dict[str, object] = {}

    def add_records(recs: list, tag: str) -> list[str]:
        """Time each file of ``recs`` as ``"<tag> <name>"``; returns the labels."""
        labels = []
        for rec in recs:
            label = f"{tag} {rec.name}"
            if rec.status != "ok":
                notes[label] = f"{rec.status}: {(rec.reason or '')[:150]}"
                print(f"  {label}: {notes[label]}", flush=True)
                # a file that loads but misses the agreement threshold is timed too, marked unverified
                if not (rec.reason or "").startswith("verification failed") or rec.path is None:
                    continue
                label += " (unverified)"
            variants[label] = Variant(rec.format, rec.path, engine=rec.engine, ort_spinning=spinning)
            records_by_label[label] = rec
            labels.append(label)
        return labels

    for tag, net, structure in nets:
        add_records(our_artifacts(net, x, work, f"{tag}_", val, calib, args.quick), tag)
        if structure is not None:
            variants[f"{tag} eager fp32"] = eager(net, tag, structure)
        print(f"{tag} artifacts exported and verified ({time.perf_counter() - t_start:.0f}s)", flush=True)

    merged: list[MergedNet] = []
    if merging and not args.skip_pruned:
        _, pruned_int8, note = ort_default(pruned, x, work, prefix="pruned25_")
        variants[f"pruned25 {ORT_INT8}"] = Variant("onnx", str(pruned_int8), ort_spinning=spinning)
        notes[f"pruned25 {ORT_INT8}"] = note
    for r in merging:
        spec = TokenReduction("merge", r=r)
        for tag, net, structure in nets:
            copy_r = apply_token_reduction(copy.deepcopy(net), spec)
            name = f"{tag} r={r}"
            if not args.random_head:
                notes[f"{name} classifier head"] = fit_head(copy_r, val_images, val[0][1])
            recs = our_artifacts(copy_r, x, work, f"{tag}_r{r}_", val, calib, args.quick, merged=True)
            labels = add_records(recs, name)
            variants[f"{name} eager fp32"] = eager(copy_r, f"{tag}_r{r}", structure, spec.as_dict())
            merged.append(MergedNet(r, tag, name, [f"{name} eager fp32", *labels], tokens_per_block(copy_r)))
            print(
                f"{name}: tokens per block {tokens_per_block(copy_r)}; files exported and verified "
                f"({time.perf_counter() - t_start:.0f}s)",
                flush=True,
            )

    env = {"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_wait_policy == "passive" else None
    busy = busy_cores()
    print(f"other processes kept {busy if busy is not None else float('nan'):.2f} cores busy before timing")
    if busy is not None and busy > 0.25:
        print(
            f"WARNING: other processes keep {busy:.2f} cores busy: they compete for the "
            f"{os.cpu_count()} cores, so wall-clock figures are noisy, and torch's OpenMP pool at >1 thread can "
            "stall for whole scheduler slices (measured here: deit_small eager 1.4 s per call at 2 threads next "
            "to one busy process, 0.12 s with --omp-wait-policy passive); compare the cpu ms column",
            flush=True,
        )
    passes = []
    failures: dict[str, str] = {}
    ready: dict[str, str] = {}
    for n in range(2 if args.repeat else 1):
        print(f"timing pass {n + 1}: load average before {load_average()}", flush=True)
        passes.append(
            interleaved_process_latency(
                variants, list(x.shape), args.threads, args.warmup, args.runs, args.rounds,
                progress=lambda msg, n=n: print(f"  pass {n + 1} {msg} ({time.perf_counter() - t_start:.0f}s)",
                                                flush=True),
                env=env,
                failures=failures,
                processes=args.processes,
                ready=ready,
            )
        )  # fmt: skip
        print(f"timing pass {n + 1} done: load average after {load_average()}", flush=True)
    for label, reason in failures.items():
        notes[f"{label} (timing)"] = f"not timed: {reason[:300]}"
    for n, stats in enumerate(passes):
        if n:
            print(f"\n--- pass {n + 1} ---")
        report(stats, records_by_label, notes if n == 0 else {}, args, {label for m in merged for label in m.labels})
        if merged:
            token_report(stats, records_by_label, merged, ready, args)
    if merged and args.profile_passes:
        matching_profile(merged, records_by_label, x, args)
    if args.repeat:
        print(
            "\nrepeat: pass 1 vs pass 2, median of the quietest round (target: within 10%) and, for comparison, "
            "the pooled median of all rounds"
        )
        columns = ("pass 1", "pass 2", "diff", "pooled 1", "pooled 2", "diff")
        print(f"  {'variant':44s} " + " ".join(f"{c:>8s}" for c in columns))
        worst = worst_pooled = 0.0
        for label in variants:
            if label not in passes[0] or label not in passes[1]:
                continue
            one, two = passes[0][label], passes[1][label]
            dev = abs(one.median_ms - two.median_ms) / min(one.median_ms, two.median_ms)
            dev_pooled = abs(one.pooled.median_ms - two.pooled.median_ms) / min(
                one.pooled.median_ms, two.pooled.median_ms
            )
            worst, worst_pooled = max(worst, dev), max(worst_pooled, dev_pooled)
            print(
                f"  {label:44s} {one.median_ms:8.2f} {two.median_ms:8.2f} {dev * 100:7.1f}% "
                f"{one.pooled.median_ms:8.2f} {two.pooled.median_ms:8.2f} {dev_pooled * 100:7.1f}%"
            )
        print(
            f"  largest disagreement {worst * 100:.1f}% -> {'PASS' if worst <= 0.10 else 'FAIL'} (<= 10%); "
            f"pooled medians: {worst_pooled * 100:.1f}%"
        )
    print(f"total time {time.perf_counter() - t_start:.0f}s; files in {work}")


def _fastest(stats: dict[str, ProcessLatency], labels: list[str]) -> tuple[str | None, ProcessLatency | None]:
    best = min(labels, key=lambda lab: stats[lab].median_ms, default=None)
    return best, (stats[best] if best else None)


def report(
    stats: dict[str, ProcessLatency], records: dict, notes: dict[str, str], args, merged: set[str] = frozenset()
) -> None:
    """The table of every timed variant and the targets of the networks without merging (``merged``: the labels of
    the token-merging variants, left out of the targets; :func:`token_report` has theirs)."""
    eager, pqv, ort8 = stats.get(EAGER), stats.get(PQV), stats.get(ORT_INT8)
    print(
        f"\n{'variant':44s} {'median ms':>9s} {'pooled':>7s} {'p90 ms':>7s} {'cpu ms':>7s} {'rounds':>6s} "
        f"{'vs eager':>8s} "
        f"{'vs ORT int8':>11s} {'vs PQV':>7s} {'agree':>6s} {'max|diff|':>9s} {'MiB':>6s}"
    )
    for label, s in stats.items():
        rec = records.get(label)
        agree = f"{rec.top1_agreement:.3f}" if rec is not None and rec.top1_agreement is not None else "-"
        diff = f"{rec.max_abs_logit_diff:.2e}" if rec is not None and rec.max_abs_logit_diff is not None else "-"
        size = f"{rec.size_bytes / 2**20:.1f}" if rec is not None and rec.size_bytes else "-"
        spread = max(s.round_medians_ms) / min(s.round_medians_ms) - 1
        print(
            f"{label:44s} {s.median_ms:9.2f} {s.pooled.median_ms:7.2f} {s.p90_ms:7.2f} {s.cpu_median_ms:7.2f} "
            f"{spread * 100:5.1f}% "
            f"{_fmt(_ratio(eager, s)):>8s} {_fmt(_ratio(ort8, s)):>11s} {_fmt(_ratio(pqv, s)):>7s} {agree:>6s} "
            f"{diff:>9s} {size:>6s}"
        )
    print(
        "  (median ms: median of the quietest round; pooled: median of all rounds' calls; p90: of all calls; "
        "cpu ms: median process CPU time per call over all threads; rounds: spread of the per-round medians, "
        "max/min - 1)"
    )
    for label, note in notes.items():
        print(f"  note {label}: {note}")

    def ours(tag: str, verified: bool, precision: str | None = None, fmt: str | None = None) -> list[str]:
        return [
            lab
            for lab, rec in records.items()
            if lab in stats
            and lab not in merged
            and lab.startswith(f"{tag} ")
            and (rec.status == "ok" or not verified)
            and (precision is None or rec.precision == precision)
            and (fmt is None or rec.format == fmt)
        ]

    cpu = cpu_info()
    peer_label, peer = _fastest(stats, [p for p in PEERS if p in stats])
    for verified in (True, False):
        best_label, best = _fastest(stats, ours("dense", verified))
        pte_label, pte = _fastest(stats, ours("dense", verified, fmt="executorch"))
        pr_label, pr = _fastest(stats, ours("pruned25", verified))
        rows = [
            (f"fastest file ({best_label}) vs fastest peer ({peer_label})", _ratio(peer, best), 1.2),
            (f"fastest file ({best_label}) vs FP32 eager", _ratio(eager, best), 6.0),
            (f"fastest .pte ({pte_label}) vs PQV-Mobile lite", _ratio(pqv, pte), 2.0),
            (f"fastest .pte ({pte_label}) vs ORT default INT8", _ratio(ort8, pte), 1.5),
        ]
        if not args.skip_pruned:
            rows.append((f"25% pruned fastest file ({pr_label}) vs dense FP32 eager", _ratio(eager, pr), 9.0))
        pool = "verified artifacts only" if verified else "every loadable artifact, verified or not"
        print(f"\ntargets over {pool} (threads={args.threads}, ratio of medians):")
        for text, value, target in rows:
            verdict = "n/a" if value is None else ("MET" if value >= target else "NOT MET")
            print(f"  {text:92s} {_fmt(value):>7s}  target >= {target}x  {verdict}")
    print(f"  (CPU {cpu.describe()}; ISA {cpu.isa()})")


#: The unmerged counterparts of a network's eager model and of its ORT default INT8 peer.
_EAGER_OF = {"dense": EAGER, "pruned25": "pruned25 eager fp32"}
_ORT_INT8_OF = {"dense": ORT_INT8, "pruned25": f"pruned25 {ORT_INT8}"}


def _tokens_of(label: str, records: dict, ready: dict[str, str]) -> list[int] | None:
    """Tokens per block as the variant itself reports them: a file's manifest record, an eager worker's ready line."""
    rec = records.get(label)
    if rec is not None:
        return (rec.extra.get("tokens") or {}).get("tokens_per_block")
    try:
        return json.loads(ready.get(label) or "{}").get("tokens", {}).get("tokens_per_block")
    except ValueError:
        return None


def token_report(
    stats: dict[str, ProcessLatency], records: dict, merged: list[MergedNet], ready: dict[str, str], args
) -> None:
    """Per ``r``: each merging variant's latency, its speed-ups over FP32 eager of the dense network, over ORT's
    default INT8 of the same network without merging and over the same variant without merging, its top-1
    agreement with the eager merging model (the file's verification) and its tokens per block; then the targets."""
    eager, cpu = stats.get(EAGER), cpu_info()
    for r in sorted({m.r for m in merged}):
        print(
            f"\ntoken merging r={r} (ToMe bipartite soft matching, {r} tokens fewer a block; median of the quietest "
            f"round, threads={args.threads}):"
        )
        print(
            f"  {'variant':44s} {'median ms':>9s} {'vs dense eager':>14s} {'vs ORT int8 r=0':>15s} "
            f"{'vs r=0':>7s} {'agree':>6s}  tokens per block (as the file / worker reports)"
        )
        nets = [m for m in merged if m.r == r]
        for m in nets:
            for label in m.labels:
                if label not in stats:
                    continue
                rec = records.get(label)
                if rec is None:  # the eager merging model: its counterpart is the eager model without merging
                    base = _EAGER_OF[m.tag]
                else:
                    base = f"{m.tag} {rec.name}"
                    base = base if base in stats else f"{base} (unverified)"
                agree = f"{rec.top1_agreement:.3f}" if rec is not None and rec.top1_agreement is not None else "-"
                tokens = _tokens_of(label, records, ready)
                shown = "-" if tokens is None else ",".join(map(str, tokens))
                if tokens is not None and tokens != m.tokens:
                    shown += f" (NOT the {m.tokens} of the model it was exported from)"
                print(
                    f"  {label:44s} {stats[label].median_ms:9.2f} {_fmt(_ratio(eager, stats[label])):>14s} "
                    f"{_fmt(_ratio(stats.get(_ORT_INT8_OF[m.tag]), stats[label])):>15s} "
                    f"{_fmt(_ratio(stats.get(base), stats[label])):>7s} {agree:>6s}  {shown}"
                )
        print(
            "  (vs dense eager: timm FP32 eager of the dense network without merging; vs ORT int8 r=0: onnxruntime's "
            "default INT8 of the same network without merging; vs r=0: the same variant without merging; agree: top-1 "
            "agreement with the eager merging model on the verification images)"
        )
        print(f"  targets at r={r} over verified files (issue 22 sets them for r=13):")
        for m in nets:
            files = [
                lab for lab in m.labels if lab in stats and lab in records and records[lab].status == "ok"
            ]  # fmt: skip
            best_label, best = _fastest(stats, files)
            agree = records[best_label].top1_agreement if best_label else None
            cost = "" if agree is None else f"  (its agreement with the eager merging model: {agree:.3f})"
            rows = [
                (f"{m.name} fastest file ({best_label}) vs dense FP32 eager", 5.0 if m.tag == "dense" else 8.0),
                (f"{m.name} fastest file ({best_label}) vs ORT default INT8 of {m.tag}, no merging", 1.5),
            ]
            values = [_ratio(eager, best), _ratio(stats.get(_ORT_INT8_OF[m.tag]), best)]
            for (text, target), value in zip(rows, values, strict=True):
                verdict = "n/a" if value is None else ("MET" if value >= target else "NOT MET")
                print(f"    {text:92s} {_fmt(value):>7s}  target >= {target}x  {verdict}{cost}")
    print(f"  (CPU {cpu.describe()}; ISA {cpu.isa()})")


def matching_profile(merged: list[MergedNet], records: dict, x: torch.Tensor, args) -> None:
    """For each verified merging ``.pte``: the share of its summed operator time (ETDump, ``--profile-passes``
    forwards after a warm-up) spent in portable kernels outside the XNNPACK delegates, i.e. the matching."""
    from pqv_lightning.measure.profile import operator_profile

    print(
        f"\nmerging .pte operator profiles (ETDump, {args.profile_passes} passes, threads={args.threads}): time "
        "outside the XNNPACK delegates (portable kernels: the matching) / summed operator time"
    )
    for m in merged:
        for label in m.labels:
            rec = records.get(label)
            if rec is None or rec.format != "executorch" or rec.status != "ok":
                continue
            try:
                rows = operator_profile(
                    rec.path, "executorch", x, top=10_000, threads=args.threads, passes=args.profile_passes
                )
            except Exception as err:  # the profile is an extra: the timings above stand without it
                print(f"  {label:44s} not profiled: {type(err).__name__}: {str(err)[:150]}")
                continue
            total = sum(row.total_ms for row in rows)
            outside = [row for row in rows if row.op.startswith(PORTABLE)]
            outside_ms = sum(row.total_ms for row in outside)
            ops = ", ".join(f"{row.op[len(PORTABLE) :]} {100 * row.share:.2f}%" for row in outside) or "none"
            print(
                f"  {label:44s} {outside_ms:7.3f} / {total:7.2f} ms = {100 * outside_ms / total:5.2f}%  ({ops}); "
                f"manifest outside_ops {rec.extra.get('outside_ops') or 'none'}"
            )


if __name__ == "__main__":
    sys.exit(main())
