"""The timm transformer zoo through the whole chain: prune 25% -> one training step -> INT8 -> `.pte` + ONNX, verified.

Run: ``python benchmarks/zoo.py [--families levit,swin] [--jobs 4] [--threads 1] [--runs 30] [--full-depth]``.

Per family, in its own process (``--jobs`` at a time): timm's smallest variant of the family (stage widths and heads as
timm defines them; depth capped, see ``--full-depth``), random initialisation trained on a synthetic 10-class task
(class templates plus noise) in rounds of 30 AdamW steps until 95% top-1 on held-out images (at most 150 steps), so that
logits have margins and INT8 agreement means something, then: L2 pruning at ratio 0.25, one SGD step on the pruned
model, its batch-norm statistics re-estimated on 288 synthetic images (``pqv_lightning.pruning.recalibrate_batch_norm``:
without it the batch norms of a network pruned and not finetuned describe the dense network, and MobileViTV2's pruned
float model fell from 0.98 to 0.52 accuracy, its INT8 files failing their check), export of FP32 and INT8 (PT2E static,
XNNPACK) ``.pte`` files and FP32 and INT8 (dynamic) ONNX files, each loaded back in its runtime (ExecuTorch,
onnxruntime) and verified against the eager model on 64 held-out synthetic images (``pqv_lightning.export``: FP32 must
agree on every top-1 and stay within 1e-3 of the logits, INT8 on at least 97%), and a dense FP32 ``.pte`` for the
latency comparison. Then, with no other job running, the batch-1 latency of the dense and the pruned FP32 ``.pte``
(ExecuTorch XNNPACK threadpool and torch fixed to ``--threads``), round-robin, median of ``--runs`` calls after 5
warm-up calls. Finally every model of ``REFUSED_EXAMPLES`` (pqv_lightning.pruning.families) is offered to the pruning
engine and its refusal printed. Prints one Markdown table, the families that passed every step and the reason of every
failed file (and writes ``zoo.json`` to ``--out-dir``; ``--table DIR/zoo.json`` prints them again)."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _common import header, interleaved_latency

#: family -> (timm model, kwargs, image size). Depth capped (stage depths 1-2, 4 blocks for plain ViTs) so that the
#: whole zoo lowers in minutes; widths, heads and block types are the variant's.
ZOO: dict[str, tuple[str, dict, int]] = {
    "vit": ("deit_tiny_patch16_224", {"img_size": 64, "depth": 4}, 64),
    "vit_blocks": ("vit_small_patch14_reg4_dinov2", {"img_size": 56, "depth": 4, "qk_norm": True}, 56),
    "efficientformer": ("efficientformer_l1", {"depths": (1, 1, 2, 2)}, 224),
    "efficientformerv2": ("efficientformerv2_s0", {"depths": (1, 1, 2, 2), "img_size": 96}, 96),
    "fastvit": ("fastvit_t8", {"layers": (1, 1, 2, 1)}, 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "mobilevitv2": ("mobilevitv2_050", {}, 64),
    "levit": ("levit_128s", {"img_size": 64, "depth": (1, 2, 2)}, 64),
    "tiny_vit": ("tiny_vit_5m_224", {"depths": [1, 1, 2, 1], "window_sizes": [4, 4, 4, 2]}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "depths": (1, 1, 2, 1), "window_size": 4}, 64),
    "swinv2": ("swinv2_tiny_window8_256", {"img_size": 64, "depths": (1, 1, 2, 1), "window_size": 4}, 64),
    "pvt_v2": ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}, 64),
    "edgenext": ("edgenext_xx_small", {"depths": (1, 1, 2, 1)}, 64),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 4, "ref_feat_shape": (4, 4)}, 56),
    "beit": ("beit_base_patch16_224", {"img_size": 64, "depth": 4}, 64),
    "cait": ("cait_xxs24_224", {"img_size": 64, "depth": 4, "depth_token_only": 1}, 64),
    "xcit": ("xcit_nano_12_p16_224", {"img_size": 64, "depth": 4}, 64),
    "pit": ("pit_ti_224", {"img_size": 64, "depth": [1, 2, 1]}, 64),
    "convit": ("convit_tiny", {"img_size": 64, "depth": 4, "local_up_to_layer": 3}, 64),
    "efficientvit_mit": ("efficientvit_b0", {"depths": (1, 1, 1, 2, 2)}, 64),
    "efficientvit_msra": ("efficientvit_m0", {"img_size": 64}, 64),
}
RATIO = 0.25


def _synthetic(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 3, size, size, generator=g)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return templates[labels] + 0.7 * torch.randn(n, 3, size, size, generator=g), labels


def build(family: str, full_depth: bool = False) -> tuple[torch.nn.Module, int]:
    name, kwargs, size = ZOO[family]
    if full_depth:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("depth", "depths", "layers", "depth_token_only")}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), size


#: Training stops when the model classifies this share of held-out images right (checked every 30 steps).
TRAINED_TOP1 = 0.95
MAX_STEPS = 150


@torch.no_grad()
def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def _train(model: torch.nn.Module, size: int) -> tuple[int, float]:
    """AdamW steps on the synthetic task until ``TRAINED_TOP1`` on held-out images (not the verification images) or
    ``MAX_STEPS``: INT8 agreement only means something where the logits have margins. After 30 steps most families
    are there; EfficientViT (MIT) was at 0.83, and its INT8 files agreed on 89-92% of images mostly by near ties.
    Returns (steps, held-out top-1)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    held_out = _synthetic(64, size, seed=99)
    step, top1 = 0, 0.0
    while step < MAX_STEPS:
        model.train()
        for _ in range(30):
            step += 1
            x, y = _synthetic(32, size, seed=step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        top1 = _top1(model, *held_out)
        if top1 >= TRAINED_TOP1:
            break
    return step, top1


def run_family(family: str, out_dir: Path, full_depth: bool, smoothing: bool = False) -> dict:
    """Everything but the latency, for one family (run in a process of its own)."""
    from pqv_lightning.export import export_artifacts
    from pqv_lightning.pruning import PruningSpec, check_supported, prune, recalibrate_batch_norm
    from pqv_lightning.quantization import smooth_outliers

    torch.set_num_threads(1)
    started = time.perf_counter()
    model, size = build(family, full_depth)
    name = ZOO[family][0]
    row: dict = {"family": family, "model": f"{name} @ {size}px"}
    row["train_steps"], row["float_top1"] = _train(model, size)
    x_cal, _ = _synthetic(32, size, seed=100)
    val = [_synthetic(64, size, seed=101)]
    spec = PruningSpec(ratio=RATIO)
    row["pruned"] = check_supported(model, spec).pruned_parts(spec, model)
    dense_model = copy.deepcopy(model)
    result = prune(model, spec, x_cal[:1])
    row.update(params=(result.params_before, result.params_after), macs=(result.macs_before, result.macs_after))
    model.train()
    x, y = _synthetic(32, size, seed=200)
    step = torch.optim.SGD(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    step.step()
    model.eval()
    # the batch norms still hold the dense network's statistics (one step renews 10% of them): re-estimate them
    row["batch_norms"] = recalibrate_batch_norm(
        model, [x_cal, *(_synthetic(32, size, seed=300 + i)[0] for i in range(8))]
    )
    weights = None
    if smoothing:  # as Quantization(smoothing=True): the INT8 files from the smoothed model, verified against model
        smoothed = smooth_outliers(model, [x_cal])
        row["smoothed"] = (len(smoothed.smoothed), len(smoothed.couplings))
        weights = {"executorch-int8": smoothed.model, "onnx-int8": smoothed.model}
    files = out_dir / family
    records = export_artifacts(
        model,
        files / "pruned",
        {"executorch": ["fp32", "int8"], "onnx": ["fp32", "int8"]},
        x_cal[:1],
        val,
        calibration=[x_cal],
        weights=weights,
    )
    dense_records = export_artifacts(dense_model, files / "dense", {"executorch": ["fp32"]}, x_cal[:1], val)
    row["files"] = {r.name: {"status": r.status, "agreement": r.top1_agreement, "reason": r.reason} for r in records}
    row["outside"] = {r.name: r.extra.get("outside_ops") for r in records if r.format == "executorch"}
    pte = {r.name: r.path for r in records if r.format == "executorch"}
    row["pte"] = {"pruned": pte.get("executorch-fp32"), "dense": dense_records[0].path}
    row["input"] = [1, 3, size, size]
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _latency(rows: list[dict], threads: int, runs: int) -> None:
    from pqv_lightning.export import load_artifact

    for row in rows:
        paths = row.get("pte", {})
        if not (paths.get("dense") and paths.get("pruned")):
            continue
        x = torch.randn(*row["input"])
        loaded = {k: load_artifact(p, "executorch", threads) for k, p in paths.items()}
        stats = interleaved_latency({k: a.bind(x) for k, a in loaded.items()}, warmup=5, runs=runs)
        row["latency_ms"] = {k: round(s.median_ms, 3) for k, s in stats.items()}


def _refusals() -> list[tuple[str, str]]:
    from pqv_lightning.pruning import UnsupportedModelError, check_supported
    from pqv_lightning.pruning.families import REFUSED_EXAMPLES

    out = []
    for name in REFUSED_EXAMPLES:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10)
        except Exception as err:  # not in this timm version
            out.append((name, f"not built: {type(err).__name__}: {err}"))
            continue
        try:
            family = check_supported(model)
            out.append((name, f"NOT refused: family {family.name}"))
        except UnsupportedModelError as err:
            message = str(err).split(". Supported families")[0]
            kind = message.split("'")[1] if message.startswith("model='") else "?"
            why = message.partition("(unsupported: ")[2][:-1] or message
            out.append((f"{name} ({kind.rpartition('.')[2]})", why))
    return out


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _ops(outside: dict | None) -> str:
    if outside is None:
        return "-"
    return ", ".join(f"{k.split('.')[0]} {v}" for k, v in sorted(outside.items())) or "none"


def table(rows: list[dict], refusals: list[tuple[str, str]], threads: int) -> str:
    lines = [
        f"| family | model | trained (held-out top-1) | params | MACs | pruned (ratio {RATIO}) "
        f"| `.pte` ops outside XNNPACK (fp32 / int8) | files verified "
        f"| `.pte` fp32 batch-1 ms, dense -> pruned ({threads} thread) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r.get('model', '')} | | | | | | FAILED: {r['error']} | |")
            continue
        (p0, p1), (m0, m1) = r["params"], r["macs"]
        files = ", ".join(
            f"{n.replace('executorch', 'pte')} {f['status']}"
            + (f" ({100 * f['agreement']:.0f}%)" if f["agreement"] is not None and "int8" in n else "")
            for n, f in r["files"].items()
        )
        if "smoothed" in r:
            files = f"INT8 from the smoothed model ({r['smoothed'][0]} of {r['smoothed'][1]} couplings): {files}"
        lat = r.get("latency_ms", {})
        latency = f"{lat['dense']:.2f} -> {lat['pruned']:.2f}" if lat else "-"
        outside = f"{_ops(r['outside'].get('executorch-fp32'))} / {_ops(r['outside'].get('executorch-int8'))}"
        trained = f"{r['train_steps']} steps, {100 * r['float_top1']:.0f}%" if "train_steps" in r else "30 steps"
        lines.append(
            f"| {r['family']} | {r['model']} | {trained} | {_fmt(p0)} -> {_fmt(p1)} (-{100 * (1 - p1 / p0):.0f}%) "
            f"| {m0 / 1e6:.1f}M -> {m1 / 1e6:.1f}M (-{100 * (1 - m1 / m0):.0f}%) | {r['pruned']} | {outside} "
            f"| {files} | {latency} |"
        )
    passed = [r["family"] for r in rows if "error" not in r and all(f["status"] == "ok" for f in r["files"].values())]
    lines += ["", f"Every step passed: {len(passed)} of {len(rows)} families ({', '.join(passed)})."]
    failures = [
        f"- {r['family']} {name}: {f['reason']}"
        for r in rows
        if "error" not in r
        for name, f in r["files"].items()
        if f["status"] != "ok"
    ]
    lines += ["", "Failed files:", *failures] if failures else []
    lines += ["", "| refused model | reason |", "|---|---|"]
    lines += [f"| {name} | {reason} |" for name, reason in refusals]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="all", help=f"comma list of {', '.join(ZOO)} (default all)")
    parser.add_argument("--jobs", type=int, default=1, help="families exported at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the latency measurement")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--full-depth", action="store_true", help="timm's variants as defined (slow)")
    parser.add_argument("--smoothing", action="store_true", help="INT8 files from the outlier-smoothed model")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--table", type=Path, default=None, help="print the table of a finished run's zoo.json")
    args = parser.parse_args()
    if args.table:
        done = json.loads(args.table.read_text())
        print(table(done["rows"], [tuple(r) for r in done["refused"]], args.threads))
        return
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="pqv-zoo-"))
    if args.worker:  # one family, in a process of its own
        try:
            row = run_family(args.worker, out_dir, args.full_depth, args.smoothing)
        except Exception as err:
            row = {"family": args.worker, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            traceback.print_exc()
        (out_dir / f"{args.worker}.json").write_text(json.dumps(row))
        return
    families = list(ZOO) if args.families == "all" else args.families.split(",")
    unknown = [f for f in families if f not in ZOO]
    if unknown:
        raise SystemExit(f"--families: {unknown} are invalid; accepted: {', '.join(ZOO)}")
    print(header(args.threads))
    started = time.perf_counter()

    def work(family: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", family, "--out-dir", str(out_dir)]
        cmd += ["--full-depth"] if args.full_depth else []
        cmd += ["--smoothing"] if args.smoothing else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        path = out_dir / f"{family}.json"
        if not path.exists():
            return {"family": family, "error": f"worker exited {done.returncode}: {done.stderr[-300:]}"}
        row = json.loads(path.read_text())
        print(f"{family}: {row.get('seconds', '?')} s {row.get('error', '')}", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(work, families))
    _latency(rows, args.threads, args.runs)
    refusals = _refusals()
    (out_dir / "zoo.json").write_text(json.dumps({"rows": rows, "refused": refusals}, indent=1))
    print(f"\nzoo: {len(families)} families in {time.perf_counter() - started:.0f} s, files in {out_dir}\n")
    print(table(rows, refusals, args.threads))


if __name__ == "__main__":
    main()
