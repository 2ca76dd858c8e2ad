"""Accuracy that quantization loses, and what mixed precision and quantization-aware training win back, on digits.

The setting, constructed so that post-training quantization loses at least a point (on digits it otherwise costs
nothing): the quickstart ViT (configs/quickstart.yaml's model and data) is trained with 50% structured pruning and
distillation, then given **outlier channels** the way large ViTs have them, by an exact reparametrisation: in every
block, ``--outliers`` channels of the attention's value projection are multiplied by ``--outlier-scale`` and the
matching input columns of the output projection divided by it. Attention is linear in the values, so the float
model computes the same function (the script prints the largest logit change), but the input of every ``proj``
layer now has a few channels ``--outlier-scale`` times larger than the rest: per-tensor INT8 activations
(``int8_pt2e:xnnpack``, static, the ``.pte``'s scheme) round the other channels away.

Then, per seed:

* **float**: the outlier model (test top-1 on the 270-image test split; everything below is measured there);
* **PTQ**: ``int8_pt2e:xnnpack`` of it, calibrated on 8 training batches;
* **PTQ + mixed precision**: the fewest layers kept in float (most sensitive first) that bring the drop on the
  *validation* split to ``--max-drop`` points (``Quantization(max_drop=...)``'s planner), reported on test;
* **QAT**: ``--qat-epochs`` more epochs of the outlier model through fake quantization
  (``QuantizationAwareTraining(start_epoch=0)``, every layer quantized), converted; and as a control, the same
  epochs without fake quantization (**float +K**) and its PTQ (**PTQ of float +K**), so that what QAT wins is not
  just more training. Each QAT model's ``.pte`` is exported and verified in the ExecuTorch runtime against the
  converted model.

Prints mean, sample std and min-max over seeds, the float layers chosen per seed and the ``.pte`` agreement.

    python benchmarks/quantization_recovery.py --seeds 0 1 2 --threads 2
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
from pqv_lightning.quantization import LogitReference, MixedPrecision, evaluate, plan_float_layers, quantize

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TARGET = "int8_pt2e:xnnpack"
WORK_DIR = tempfile.mkdtemp(prefix="pqv-quantization-recovery-")  # distillation's teacher file goes here
COLUMNS = ("float", "PTQ", "PTQ + mixed", "QAT", "float +K", "PTQ of float +K")


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


def pte_agreement(variant, val: list, work: Path) -> tuple[str, float | None]:
    records = export_artifacts(variant.source, work, ["executorch"], val[0][0][:1], val, quantized=[variant],
                               executorch_precisions=())  # fmt: skip
    (record,) = records
    return record.status, record.top1_agreement


def run(args: argparse.Namespace) -> None:
    config = yaml.safe_load(QUICKSTART.read_text())
    model_args, data_args = config["model"]["init_args"], {**config["data"]["init_args"], "augment": False}
    rows: dict[str, list[float]] = {c: [] for c in COLUMNS}
    notes = []
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
        change = add_outliers(module.model, args.outliers, args.outlier_scale)
        val = [(x, y) for x, y in data.val_dataloader()]
        test = [(x, y) for x, y in data.test_dataloader()]
        calibration = [x for x, _ in list(data.train_dataloader())[:8]]
        model = module.model
        rows["float"].append(top1(model, test))
        ptq = quantize(model, TARGET, test[0][0][:1], calibration)
        rows["PTQ"].append(top1(ptq.module, test))
        plan = plan_float_layers(model, TARGET, MixedPrecision(max_drop=args.max_drop), LogitReference.of(model, val),
                                 calibration)  # fmt: skip
        mixed = quantize(model, TARGET, test[0][0][:1], calibration, float_layers=plan.float_layers)
        rows["PTQ + mixed"].append(top1(mixed.module, test))
        control, _ = continue_training(module, data, args.qat_epochs, args.lr, qat=False)
        rows["float +K"].append(top1(control.model.eval(), test))
        control_ptq = quantize(control.model, TARGET, test[0][0][:1], calibration)
        rows["PTQ of float +K"].append(top1(control_ptq.module, test))
        _, result = continue_training(module, data, args.qat_epochs, args.lr, qat=True)
        rows["QAT"].append(top1(result.variant.module, test))
        status, agreement = pte_agreement(result.variant, test, Path(WORK_DIR) / f"pte-{seed}")
        notes.append(
            f"seed {seed}: outliers changed the float logits by at most {change:.2e}; mixed precision kept "
            f"{len(plan.float_layers)} layer(s) in float ({', '.join(plan.float_layers) or 'none'}; val drop "
            f"{plan.drop:.2f} points); QAT .pte {status}, top-1 agreement with the converted QAT model "
            f"{agreement if agreement is None else f'{agreement:.4f}'}; {time.perf_counter() - start:.0f}s"
        )
        print(notes[-1], flush=True)
        print("  " + "  ".join(f"{c} {rows[c][-1]:.2f}" for c in COLUMNS), flush=True)
    print(f"\n{TARGET} on the {args.ratio:.0%}-pruned quickstart ViT with {args.outliers} outlier value channels "
          f"x{args.outlier_scale:g} per block; test top-1 % on 270 images (1 image = 0.37 points), seeds "
          f"{' '.join(map(str, args.seeds))}\n")  # fmt: skip
    print(f"| {'variant':<16} | mean | std | min | max | Δ vs float |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.mean(rows["float"])
    for column in COLUMNS:
        values = rows[column]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {column:<16} | {statistics.mean(values):.2f} | {std:.2f} | {min(values):.2f} | {max(values):.2f} "
              f"| {statistics.mean(values) - base:+.2f} |")  # fmt: skip


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
