"""``pqv-export``: quantize, export and verify a trained pqv-lightning checkpoint, without training.

    pqv-export --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt \\
        --quantize int8_dynamic:x86 fp16 --artifacts torchscript onnx=fp32,int8 --output-dir artifacts

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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.checkpoint import CheckpointError, ClassifierCheckpoint, load_classifier_checkpoint
from pqv_lightning.export import check_output_dir
from pqv_lightning.export.formats import (
    artifacts_from_arguments,
    format_names,
    get_format,
    legacy_artifact_keys,
    list_formats,
)
from pqv_lightning.pipeline import (
    CALIBRATION_SPLITS,
    ExportConfig,
    QuantizationConfig,
    artifacts_table,
    run_pipeline,
)
from pqv_lightning.quantization import results_table
from pqv_lightning.utils.checks import check_int, invalid
from pqv_lightning.utils.progress import Progress

__all__ = ["build_parser", "load_classifier", "main"]


def load_classifier(path: str | os.PathLike) -> ClassifierCheckpoint:
    """The timm model of a ViTClassifier checkpoint (weights-only read, pruned structure rebuilt) and its settings."""
    return load_classifier_checkpoint(path)


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
        "--smoothing",
        action="store_true",
        help="move activation outliers into the weights before quantizing (exact in float; needs --quantize): the "
        "variants and every exported file are built from the smoothed model",
    )
    formats = "; ".join(
        f"{f.name}: {', '.join(f.precisions)} (default {','.join(f.default_precisions)})" for f in list_formats()
    )
    parser.add_argument(
        "--artifacts",
        nargs="+",
        default=None,
        metavar="FORMAT[=PRECISION,...]",
        help=f"the files to write, each format with its precisions or alone for its defaults ({formats}; default: "
        f"{' '.join(format_names(default_only=True))})",
    )
    options = "; ".join(
        f"{f.name}.{o.name}: {'/'.join(map(str, o.choices))}" for f in list_formats() for o in f.options
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="FORMAT.OPTION=VALUE", help=f"a format setting ({options})"
    )
    parser.add_argument("--output-dir", help="folder for the files and manifest.json (default: <checkpoint>_export)")
    # the flags of 0.1 (--formats, --<format>-precisions, --<format>-<option>): accepted, with a deprecation warning
    parser.add_argument("--formats", nargs="+", default=None, help=argparse.SUPPRESS)
    for key, (_, option) in legacy_artifact_keys().items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, dest=key, nargs=None if option else "+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help="fixed batch size of the exported files")
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches to verify on (all)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches for calibrated methods")
    parser.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default="train")
    parser.add_argument("--data-batch-size", type=int, default=64, help="batch size of the data loaders")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return parser


def _parse_artifacts(values: Sequence[str] | None) -> dict[str, list[str] | None] | None:
    """``["executorch=fp32,int8", "onnx"]`` as ``{"executorch": ["fp32", "int8"], "onnx": None}`` (defaults)."""
    if values is None:
        return None
    artifacts: dict[str, list[str] | None] = {}
    for value in values:
        fmt, sep, precisions = value.partition("=")
        artifacts[fmt.strip()] = _split_list([precisions]) if sep else None
    return artifacts


def _option_value(fmt: str, option: str, text: Any, flag: str) -> Any:
    """A command-line option value as the type of the option's choices (``true``/``false`` for a flag)."""
    if text is None:
        return None
    choices = get_format(fmt).option(option).choices
    for choice in choices:
        if str(choice).lower() == str(text).strip().lower():
            return choice
    raise invalid(flag, text, ", ".join(map(str, choices)))


def _parse_options(values: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """``["executorch.attention=fp16"]`` as ``{"executorch": {"attention": "fp16"}}``."""
    options: dict[str, dict[str, Any]] = {}
    for value in values:
        key, sep, text = value.partition("=")
        fmt, dot, option = key.strip().partition(".")
        if not (sep and dot):
            raise invalid("--option", value, "FORMAT.OPTION=VALUE, e.g. executorch.attention=fp16")
        get_format(fmt, "--option format")
        options.setdefault(fmt, {})[option] = _option_value(fmt, option, text, f"--option {key.strip()}")
    return options or None


def _datamodule(data: str, classifier: ClassifierCheckpoint, batch_size: int, num_workers: int) -> Any:
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
        model_name=classifier.hyper_parameters["model_name"],
        img_size=height,
        in_chans=channels,
        batch_size=batch_size,
        num_workers=num_workers,
        augment="none",  # calibration images from the training split, as the model will see them
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pqv-export``; returns the exit status (bad arguments exit with status 2 before any work)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for name in ("batch_size", "data_batch_size"):
            check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
        legacy = {"formats": _split_list(args.formats) or None}
        for key, (fmt, option) in legacy_artifact_keys().items():
            value = getattr(args, key)
            legacy[key] = (
                _option_value(fmt, option, value, "--" + key.replace("_", "-"))
                if option
                else (None if value is None else _split_list(value))
            )
        artifacts, options = artifacts_from_arguments(
            _parse_artifacts(args.artifacts), _parse_options(args.option), legacy, "pqv-export"
        )
        export = ExportConfig(
            artifacts,
            options,
            val_batches=check_int("--val-batches", args.val_batches, 1, allow_none=True),
            batch_size=args.batch_size,
            calibration_batches=check_int("--calibration-batches", args.calibration_batches, 0),
            calibration_split=args.calibration_split,
        )
        quantization = None
        if args.smoothing and not args.quantize:
            raise ValueError("--smoothing needs --quantize TARGET ... (smoothing is part of the quantization stage)")
        if args.quantize:
            quantization = QuantizationConfig(
                tuple(_split_list(args.quantize)),
                args.calibration_batches,
                args.calibration_split,
                args.val_batches,
                smoothing=args.smoothing,
            )
        checkpoint = Path(args.checkpoint)
        out_dir = check_output_dir(args.output_dir or checkpoint.with_name(f"{checkpoint.stem}_export"))
        export = replace(export, output_dir=out_dir)
        classifier = load_classifier(checkpoint)
        datamodule = _datamodule(args.data, classifier, args.data_batch_size, args.num_workers)
    except (CheckpointError, ValueError, OSError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    datamodule.setup("fit")
    meta: dict[str, Any] = {
        "checkpoint": str(checkpoint.resolve()),
        "model_name": classifier.hyper_parameters["model_name"],
        "data": args.data,
    }
    result = run_pipeline(
        classifier.model,
        datamodule.val_dataloader(),
        datamodule.train_dataloader(),
        quantization=quantization,
        export=export,
        manifest_meta=meta,
        progress=Progress("pqv-export"),
    )
    if result.quantization_error is not None:
        print(f"pqv-export: quantization failed: {result.quantization_error}", file=sys.stderr)
    elif quantization is not None:
        print(f"Quantization (validation accuracy)\n{results_table(result.float_metrics, result.quantization)}\n")
    outcome = result.export
    if outcome.error is not None:
        print(f"pqv-export: export failed: {outcome.error} (manifest: {outcome.manifest})", file=sys.stderr)
        return 1
    print(artifacts_table(outcome.records))
    failed = [r.name for r in outcome.records if r.status == "failed"]
    print(f"\nmanifest: {outcome.manifest}")
    if failed:
        print(f"pqv-export: {len(failed)} artifact(s) failed verification: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
