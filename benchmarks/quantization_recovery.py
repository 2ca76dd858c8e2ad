"""Accuracy that quantization loses to outliers, and what smoothing, GPTQ, mixed precision and QAT win back, on digits.

The setting, constructed so that post-training quantization loses points (on digits it otherwise costs nothing): the
quickstart ViT (configs/quickstart.yaml's model and data) is trained with 50% structured pruning and distillation,
then given **outlier channels** the way large ViTs have them. ``--setting value`` (default) does it by an exact
reparametrisation: in every block, ``--outliers`` channels of the attention's value projection are multiplied by
``--outlier-scale`` and the matching input columns of the output projection divided by it. Attention is linear in
the values, so the float model computes the same function (the script prints the largest logit change), but the
input of every ``proj`` layer now has a few channels ``--outlier-scale`` times larger than the rest: per-tensor
INT8 activations round the other channels away. ``--setting gelu`` puts the outliers where smoothing cannot reach
by construction: the same channels of every MLP's ``fc1`` (weight and bias) times the scale and ``fc2``'s columns
divided by it. GELU is not homogeneous, so that *changes* the network (its float top-1 is the baseline then) and no
exact rewrite can take the outliers out of ``fc2``'s input again.

Then, per seed (test top-1 on the 270-image test split; calibration: 8 training batches):

* **float**: the outlier model;
* **PTQ**: ``int8_pt2e:xnnpack`` (the ``.pte``'s static scheme), every layer INT8;
* **+ smooth**: the same on :func:`~pqv_lightning.quantization.smooth_outliers`'s model (exact in float), and
  **+ smooth + GPTQ**: with GPTQ rounding and bias correction of the linear weights on that grid;
* **.pte smooth**: the ExecuTorch file of the smoothed model (``int8``, built by the export stage), top-1 computed
  by the ExecuTorch runtime, with its agreement with the float model in the notes;
* **x86 PTQ / x86 smooth**: ``int8_static:x86`` (torch.ao), plain and smoothed;
* **ORT QDQ / ORT QDQ smooth**: the ONNX ``int8_qdq`` file (static, calibrated by onnxruntime), plain and smoothed,
  top-1 computed by onnxruntime;
* **PTQ + mixed**: the fewest layers kept in float (most sensitive first) that bring the drop on the *validation*
  split to ``--max-drop`` points (``Quantization(max_drop=...)``'s planner);
* **int4 / int4 GPTQ**: ``int4_weight`` (4-bit weights in groups of 32, dynamic INT8 activations), nearest rounding
  and GPTQ + bias correction, on the outlier model and (**int4 base / int4 base GPTQ**) on the model before the
  outliers were added;
* with ``--qat``: **QAT** (``--qat-epochs`` more epochs through fake quantization, every layer quantized), and as a
  control **float +K** and **PTQ of float +K** (the same epochs without fake quantization).

Prints mean, sample std and min-max over seeds, the float layers chosen per seed and the files' agreements.

    python benchmarks/quantization_recovery.py --seeds 0 1 2 --threads 2
    python benchmarks/quantization_recovery.py --seeds 0 1 2 --threads 2 --setting gelu
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from torch import nn

from pqv_lightning import ViTClassifier
from pqv_lightning.apps.trainers import quiet_trainer
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.qat import QuantizationAwareTraining
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.export import export_artifacts
from pqv_lightning.measure import cpu_info
from pqv_lightning.quantization import (
    BudgetNotMetError,
    LogitReference,
    MixedPrecision,
    evaluate,
    plan_float_layers,
    quantize,
    smooth_outliers,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TARGET = "int8_pt2e:xnnpack"
WORK_DIR = tempfile.mkdtemp(prefix="pqv-quantization-recovery-")  # distillation's teacher file goes here
COLUMNS = (
    "float", "PTQ", "+ smooth", "+ smooth + GPTQ", ".pte smooth", "x86 PTQ", "x86 smooth", "ORT QDQ",
    "ORT QDQ smooth", "PTQ + mixed", "int4", "int4 GPTQ", "float base", "int4 base", "int4 base GPTQ",
)  # fmt: skip
QAT_COLUMNS = ("QAT", "float +K", "PTQ of float +K")


def add_outliers(model: nn.Module, channels: int, scale: float) -> float:
    """Multiply ``channels`` value channels of every attention by ``scale`` and divide the matching input columns
    of its output projection by it (in place): the same function, with outlier channels at every ``proj`` input.
    Returns the largest change of the logits on random images (float rounding only)."""
    images = torch.randn(16, *_input_shape(model), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(images)
        for block in model.blocks:
            attn = block.attn
            dim = attn.attn_dim if hasattr(attn, "attn_dim") else attn.qkv.out_features // 3
            picked = torch.arange(channels) * (dim // channels)  # spread over the heads
            attn.qkv.weight[2 * dim + picked] *= scale
            if attn.qkv.bias is not None:
                attn.qkv.bias[2 * dim + picked] *= scale
            attn.proj.weight[:, picked] /= scale
        return float((model(images) - before).abs().max())


def add_mlp_outliers(model: nn.Module, channels: int, scale: float) -> float:
    """Multiply ``channels`` hidden channels of every MLP's ``fc1`` by ``scale`` and divide ``fc2``'s matching input
    columns by it (in place). Across GELU this changes the network; returns the largest logit change on random
    images."""
    images = torch.randn(16, *_input_shape(model), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(images)
        for block in model.blocks:
            mlp = block.mlp
            hidden = mlp.fc1.out_features
            picked = torch.arange(channels) * (hidden // channels)
            mlp.fc1.weight[picked] *= scale
            mlp.fc1.bias[picked] *= scale
            mlp.fc2.weight[:, picked] /= scale
        return float((model(images) - before).abs().max())


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    conv = model.patch_embed.proj
    size = model.patch_embed.img_size
    return conv.in_channels, size[0], size[1]


def top1(module: nn.Module, batches: list) -> float:
    return evaluate(module, batches)["top1"]


def continue_training(module: ViTClassifier, data: DigitsDataModule, epochs: int, lr: float, qat: bool):
    """``epochs`` more epochs of ``module`` (a copy) at ``lr`` (cosine, no warm-up), through fake quantization if
    ``qat``; returns (module, QAT result or None)."""
    module.trainer = None  # the finished fit's trainer is not copied along
    module = copy.deepcopy(module)
    module.hparams.lr, module.hparams.warmup_epochs = lr, 0.0
    callback = QuantizationAwareTraining(TARGET, start_epoch=0) if qat else None
    quiet_trainer(epochs, [callback] if qat else [], default_root_dir=WORK_DIR, num_sanity_val_steps=0,
                  limit_val_batches=0).fit(module, datamodule=data)  # fmt: skip
    return module, (callback.result if qat else None)


def file_top1(model: nn.Module, fmt: str, precision: str, test: list, calibration: list, work: Path):
    """(top-1 % computed by the file's runtime, agreement with ``model``, status) of one exported file."""
    records = export_artifacts(model, work, {fmt: [precision]}, test[0][0][:1], test, calibration=calibration)
    (record,) = records
    top1 = 100 * record.val_top1 if record.val_top1 is not None else float("nan")
    return top1, record.top1_agreement, record.status


def pte_agreement(variant, val: list, work: Path) -> tuple[str, float | None]:
    records = export_artifacts(variant.source, work, ["executorch"], val[0][0][:1], val, quantized=[variant],
                               executorch_precisions=())  # fmt: skip
    (record,) = records
    return record.status, record.top1_agreement


def run(args: argparse.Namespace) -> None:
    config = yaml.safe_load(QUICKSTART.read_text())
    model_args, data_args = config["model"]["init_args"], {**config["data"]["init_args"], "augment": False}
    columns = COLUMNS + (QAT_COLUMNS if args.qat else ())
    rows: dict[str, list[float]] = {c: [] for c in columns}
    for seed in args.seeds:
        start = time.perf_counter()
        pl.seed_everything(seed, workers=True)
        data = DigitsDataModule(**data_args)
        data.setup()
        module = ViTClassifier(**model_args)
        callbacks = [StructuredPruning(ratio=args.ratio, importance="l2", at_epoch=args.prune_epoch),
                     KnowledgeDistillation()]  # fmt: skip
        quiet_trainer(args.epochs, callbacks, default_root_dir=WORK_DIR, num_sanity_val_steps=0,
                      limit_val_batches=0).fit(module, datamodule=data)  # fmt: skip
        module.eval()
        val = [(x, y) for x, y in data.val_dataloader()]
        test = [(x, y) for x, y in data.test_dataloader()]
        calibration = [x for x, _ in list(data.train_dataloader())[:8]]
        example = test[0][0][:1]
        base = copy.deepcopy(module.model)
        add = add_outliers if args.setting == "value" else add_mlp_outliers
        change = add(module.model, args.outliers, args.outlier_scale)
        model = module.model
        got = rows.__getitem__
        got("float").append(top1(model, test))
        got("PTQ").append(top1(quantize(model, TARGET, example, calibration).module, test))
        smoothed = smooth_outliers(model, calibration)
        got("+ smooth").append(top1(quantize(smoothed.model, TARGET, example, calibration).module, test))
        gptq = quantize(smoothed.model, TARGET, example, calibration, rounding="gptq", bias_correction=True)
        got("+ smooth + GPTQ").append(top1(gptq.module, test))
        work = Path(WORK_DIR) / f"files-{seed}"
        pte_top1, pte_agreement_, pte_status = file_top1(smoothed.model, "executorch", "int8", test, calibration,
                                                          work / "pte")  # fmt: skip
        got(".pte smooth").append(pte_top1)
        got("x86 PTQ").append(top1(quantize(model, "int8_static:x86", example, calibration).module, test))
        x86 = quantize(smoothed.model, "int8_static:x86", example, calibration)
        got("x86 smooth").append(top1(x86.module, test))
        ort = file_top1(model, "onnx", "int8_qdq", test, calibration, work / "ort")
        ort_smooth = file_top1(smoothed.model, "onnx", "int8_qdq", test, calibration, work / "ort-smooth")
        got("ORT QDQ").append(ort[0])
        got("ORT QDQ smooth").append(ort_smooth[0])
        try:
            plan = plan_float_layers(model, TARGET, MixedPrecision(max_drop=args.max_drop),
                                     LogitReference.of(model, val), calibration)  # fmt: skip
        except BudgetNotMetError as err:  # no column value for this seed: the planner refuses, and says why
            plan, mixed_note = None, f"mixed precision: budget not met ({str(err)[:160]}...)"
            got("PTQ + mixed").append(float("nan"))
        else:
            mixed = quantize(model, TARGET, example, calibration, float_layers=plan.float_layers)
            got("PTQ + mixed").append(top1(mixed.module, test))
            mixed_note = (f"mixed precision kept {len(plan.float_layers)} layer(s) in float "
                          f"({', '.join(plan.float_layers) or 'none'}; val drop {plan.drop:.2f} points)")  # fmt: skip
        for name, network in (("int4", model), ("int4 base", base)):
            got(name).append(top1(quantize(network, "int4_weight", example).module, test))
            rounded = quantize(network, "int4_weight", example, calibration, rounding="gptq", bias_correction=True)
            got(f"{name} GPTQ").append(top1(rounded.module, test))
        got("float base").append(top1(base, test))
        note = (
            f"seed {seed}: outliers changed the float logits by at most {change:.2e}; {smoothed.summary()}; "
            f"{gptq.info['rounding']}; .pte smooth {pte_status} (agreement {pte_agreement_:.4f}); ORT QDQ "
            f"{ort[2]} ({ort[1]:.4f}), smoothed {ort_smooth[2]} ({ort_smooth[1]:.4f}); {mixed_note}"
        )
        if args.qat:
            control, _ = continue_training(module, data, args.qat_epochs, args.lr, qat=False)
            got("float +K").append(top1(control.model.eval(), test))
            control_ptq = quantize(control.model, TARGET, example, calibration)
            got("PTQ of float +K").append(top1(control_ptq.module, test))
            _, result = continue_training(module, data, args.qat_epochs, args.lr, qat=True)
            got("QAT").append(top1(result.variant.module, test))
            status, agreement = pte_agreement(result.variant, test, work / "qat")
            note += f"; QAT .pte {status}, agreement with the converted QAT model {agreement}"
        print(f"{note}; {time.perf_counter() - start:.0f}s", flush=True)
        print("  " + "  ".join(f"{c} {rows[c][-1]:.2f}" for c in columns), flush=True)
    where = "value channels (exact)" if args.setting == "value" else "MLP hidden channels across GELU (not exact)"
    print(f"\n{TARGET} unless named, on the {args.ratio:.0%}-pruned quickstart ViT with {args.outliers} outlier "
          f"{where} x{args.outlier_scale:g} per block; test top-1 % on 270 images (1 image = 0.37 points), seeds "
          f"{' '.join(map(str, args.seeds))}\n")  # fmt: skip
    print(f"| {'variant':<16} | mean | std | min | max | Δ vs float |")
    print("|---|---:|---:|---:|---:|---:|")
    for column in columns:
        values = [v for v in rows[column] if v == v]  # a seed without a value (a budget not met) is left out
        if not values:
            print(f"| {column:<16} | - | - | - | - | - |")
            continue
        reference = rows["float base" if "base" in column else "float"]
        seeds = [r for r, v in zip(reference, rows[column], strict=True) if v == v]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        shown = column if len(values) == len(reference) else f"{column} ({len(values)} of {len(reference)} seeds)"
        print(f"| {shown:<16} | {statistics.mean(values):.2f} | {std:.2f} | {min(values):.2f} | {max(values):.2f} "
              f"| {statistics.mean(values) - statistics.mean(seeds):+.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (dense, then pruned + distilled)")
    parser.add_argument("--prune-epoch", type=int, default=15)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--outliers", type=int, default=3, help="outlier value channels per block")
    parser.add_argument(
        "--outlier-scale", type=float, default=200.0,
        help="x50 cost PTQ 0.6 points on average here, x100 0.4-1.5 on seed 0 (by the calibration batches), x200 15",
    )  # fmt: skip
    parser.add_argument("--max-drop", type=float, default=0.3, help="mixed precision budget on validation, points")
    parser.add_argument("--setting", choices=("value", "gelu"), default="value", help="where the outliers go")
    parser.add_argument("--qat", action="store_true", help="also the QAT columns and their float control")
    parser.add_argument("--qat-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of the QAT (and control) epochs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 0 <= args.prune_epoch < args.epochs:
        parser.error(f"--prune-epoch must be in [0, {args.epochs}), got {args.prune_epoch}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    cpu = cpu_info()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in cpu.flags]
    print(f"CPU: {cpu.describe()}, ISA {' '.join(isa) or 'no AVX2'} | torch threads {args.threads} | "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    print("command: python " + " ".join(sys.argv), flush=True)
    run(args)


if __name__ == "__main__":
    main()
