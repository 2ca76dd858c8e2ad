"""``pqv-export``: quantize, export and verify a trained pqv-lightning checkpoint, without training.

    pqv-export --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt \\
        --quantize int8_dynamic:x86 fp16 --formats torchscript onnx --output-dir artifacts

The checkpoint (pruned or not) is loaded with ``weights_only=True``: nothing in it is unpickled. Every file is
loaded back in its own runtime and compared with the eager model on real validation images; ``manifest.json``
in the output folder lists them. Exit status: 0 when every artifact was verified (or skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.callbacks.export import (
    artifacts_table,
    export_and_report,
    needs_calibration,
)
from pqv_lightning.callbacks.quantization import (
    CALIBRATION_SPLITS,
    collect_batches,
    parse_targets,
    quantize_and_evaluate,
    results_table,
)
from pqv_lightning.export import (
    EXECUTORCH_PRECISIONS,
    FORMATS,
    ONNX_PRECISIONS,
    check_output_dir,
    validate_formats,
    validate_precisions,
)
from pqv_lightning.module import ViTClassifier

__all__ = ["build_parser", "load_classifier", "main"]

_EXPECTED = (
    "a pqv-lightning checkpoint: a Lightning .ckpt of pqv_lightning.ViTClassifier (a dict with 'state_dict' "
    "holding 'model.*' weights and 'hyper_parameters' holding 'model_name' and 'num_classes')"
)


def load_classifier(path: str | os.PathLike) -> ViTClassifier:
    """Check that ``path`` is a ViTClassifier checkpoint (weights-only read), then load it on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file; expected {_EXPECTED}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"{str(path)!r} is not {_EXPECTED}; it cannot be read as a weights-only torch file "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})."
        ) from err
    problem = None
    if not isinstance(checkpoint, dict):
        problem = f"it holds a {type(checkpoint).__name__}, not a dict"
    elif not isinstance(checkpoint.get("state_dict"), dict):
        problem = f"it has no 'state_dict' (keys: {sorted(map(str, checkpoint))[:8]})"
    elif not isinstance(checkpoint.get("hyper_parameters"), dict):
        problem = "it has no 'hyper_parameters'"
    else:
        missing = [key for key in ("model_name", "num_classes") if key not in checkpoint["hyper_parameters"]]
        if missing:
            problem = f"its hyper_parameters lack {missing}"
        elif not any(str(key).startswith("model.") for key in checkpoint["state_dict"]):
            problem = "its state_dict has no 'model.*' weights"
    del checkpoint
    if problem is not None:
        raise ValueError(f"{str(path)!r} is not {_EXPECTED}: {problem}.")
    return ViTClassifier.from_checkpoint(path)


def _split_list(values: Sequence[str] | None) -> list[str]:
    """Accept both ``a b`` and ``a,b``."""
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqv-export",
        description="Quantize and export a trained pqv-lightning checkpoint (pruned or not) to mobile/edge "
        "formats; every file is verified in its own runtime on real validation images and listed in "
        "manifest.json.",
    )
    parser.add_argument("--checkpoint", required=True, help="pqv-lightning (ViTClassifier) .ckpt file")
    parser.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn digits, offline; default) or a Hugging Face data set: hub name, image "
        "folder or save_to_disk folder",
    )
    parser.add_argument(
        "--quantize",
        nargs="*",
        default=[],
        metavar="TARGET",
        help="quantization targets 'method[:backend]', e.g. int8_dynamic:x86 int8_static:qnnpack fp16 "
        "int8_pt2e:xnnpack int4_weight (space or comma separated)",
    )
    parser.add_argument(
        "--formats", nargs="+", default=list(FORMATS), metavar="FORMAT", help=f"any of {', '.join(FORMATS)}"
    )
    parser.add_argument("--output-dir", help="folder for the files and manifest.json (default: <checkpoint>_export)")
    parser.add_argument(
        "--executorch-precisions",
        nargs="+",
        default=["fp32", "int8", "int4"],
        help=f"any of {', '.join(EXECUTORCH_PRECISIONS)}",
    )
    parser.add_argument(
        "--onnx-precisions", nargs="+", default=["fp32", "int8"], help=f"any of {', '.join(ONNX_PRECISIONS)}"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="fixed batch size of the exported files")
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches to verify on (all)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches for calibrated methods")
    parser.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default="train")
    parser.add_argument("--data-batch-size", type=int, default=64, help="batch size of the data loaders")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return parser


def _datamodule(data: str, classifier: ViTClassifier, batch_size: int, num_workers: int) -> Any:
    from pqv_lightning.datamodules.hf import resolve_timm_data_config

    channels, height, width = resolve_timm_data_config(classifier.model)["input_size"]
    if data == "digits":
        from pqv_lightning.datamodules import DigitsDataModule

        if height != width:
            raise ValueError(f"The digits data needs a square input; the model takes {height}x{width}.")
        return DigitsDataModule(img_size=height, in_chans=channels, batch_size=batch_size, num_workers=num_workers)
    from pqv_lightning.datamodules.hf import HFImageDataModule

    if height != width:
        raise ValueError(f"HFImageDataModule resizes to square images; the model takes {height}x{width}.")
    return HFImageDataModule(
        data,
        model_name=classifier.hparams.model_name,
        img_size=height,
        in_chans=channels,
        batch_size=batch_size,
        num_workers=num_workers,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pqv-export``; returns the exit status (bad arguments exit with status 2 before any work)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        formats = validate_formats(_split_list(args.formats))
        executorch = validate_precisions(_split_list(args.executorch_precisions), EXECUTORCH_PRECISIONS, "executorch")
        onnx = validate_precisions(_split_list(args.onnx_precisions), ONNX_PRECISIONS, "onnx")
        for name in ("batch_size", "data_batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
        if args.val_batches is not None and args.val_batches < 1:
            raise ValueError(f"--val-batches must be >= 1, got {args.val_batches}.")
        targets = parse_targets(_split_list(args.quantize), args.calibration_batches) if args.quantize else []
        if args.calibration_batches < 1 and needs_calibration(formats, executorch, onnx):
            raise ValueError("--calibration-batches must be >= 1 for executorch 'int8' / onnx 'int8_qdq'.")
        checkpoint = Path(args.checkpoint)
        out_dir = check_output_dir(args.output_dir or checkpoint.with_name(f"{checkpoint.stem}_export"))
        classifier = load_classifier(checkpoint)
        datamodule = _datamodule(args.data, classifier, args.data_batch_size, args.num_workers)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    datamodule.setup("fit")
    model = classifier.model.eval()
    val = collect_batches(datamodule.val_dataloader(), args.val_batches, "validation")
    calibrate = needs_calibration(formats, executorch, onnx) or any(
        t.method in ("int8_static", "int8_pt2e") for t in targets
    )
    calibration = None
    if calibrate:
        loader = datamodule.train_dataloader() if args.calibration_split == "train" else datamodule.val_dataloader()
        calibration = collect_batches(loader, args.calibration_batches, args.calibration_split)
    meta: dict[str, Any] = {
        "checkpoint": str(checkpoint.resolve()),
        "model_name": classifier.hparams.model_name,
        "data": args.data,
    }
    quantized = []
    if targets:
        float_metrics, results = quantize_and_evaluate(model, targets, val, calibration)
        print(f"Quantization (validation accuracy)\n{results_table(float_metrics, results)}\n")
        quantized = [r.quantized for r in results if r.quantized is not None]
        meta["quantization"] = {
            "float": float_metrics,
            "variants": {r.name: r.metrics() if r.error is None else {"error": r.error} for r in results},
        }
    records, manifest, error = export_and_report(
        model,
        out_dir,
        formats,
        val,
        quantized=quantized,
        calibration=None if calibration is None else [images for images, _ in calibration],
        executorch_precisions=executorch,
        onnx_precisions=onnx,
        batch_size=args.batch_size,
        meta=meta,
    )
    if error is not None:
        print(f"pqv-export: export failed: {error} (manifest: {manifest})", file=sys.stderr)
        return 1
    print(artifacts_table(records))
    failed = [r.name for r in records if r.status == "failed"]
    print(f"\nmanifest: {manifest}")
    if failed:
        print(f"pqv-export: {len(failed)} artifact(s) failed verification: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
