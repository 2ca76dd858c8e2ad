"""Export a vision model to mobile/edge formats, verify every file in its own runtime, and load files back.

The names below are imported on first use (PEP 562), each from the module that holds it, so that a process
that only loads one file (``python -m pqv_lightning.export.probe``) imports that runtime and nothing else: an
ONNX probe imports neither torch nor Lightning.

Modules: :mod:`~.formats` (the format registry: names, suffixes, precisions, options), :mod:`~.loader`
(:func:`load_artifact`), :mod:`~.exporter` (:func:`export_artifacts`), :mod:`~.writer` and :mod:`~.verify` (one
file written, reloaded and checked), :mod:`~.manifest`, one module per format (:mod:`~.torchscript`,
:mod:`~.executorch`, :mod:`~.onnx`, ..., and :mod:`~.eager` for in-process modules), the graph rewrites
(:mod:`~.xnnpack_rewrites`, :mod:`~.onnxruntime_rewrites`, :mod:`~.patchify`), :mod:`~.xnnpack_casts` (fp32 <-> fp16
casts inside the XNNPACK delegate), :mod:`~.inputs` (tensor argument checks) and :mod:`~.probe`.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports are the re-exports that __getattr__ makes at run time)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers
    from pqv_lightning.export.executorch import (
        FP16_ATTENTION_PRECISIONS,
        PteResult,
        check_attention,
        export_pte,
        run_pte,
    )
    from pqv_lightning.export.exporter import check_output_dir, export_artifacts
    from pqv_lightning.export.formats import (
        DEFAULT_FORMATS,
        FORMATS,
        SUFFIXES,
        ExportFormat,
        FormatOption,
        LoadedArtifact,
        format_of,
        get_format,
        list_formats,
        register_format,
        resolve_artifacts,
        validate_formats,
    )
    from pqv_lightning.export.loader import load_artifact
    from pqv_lightning.export.manifest import MANIFEST_VERSION, ArtifactRecord, environment, write_manifest
    from pqv_lightning.export.onnx import ONNX_OPSET
    from pqv_lightning.export.onnxruntime_rewrites import prepare_for_onnxruntime
    from pqv_lightning.export.patchify import is_patchify_conv, to_patches
    from pqv_lightning.export.torchscript import optimize_for_mobile_status
    from pqv_lightning.export.verify import VerifyThresholds
    from pqv_lightning.export.xnnpack_rewrites import prepare_for_xnnpack, register_xnnpack_rewrite

# Each public name and the module it is imported from on first use.
_MODULE_OF = {
    "DEFAULT_FORMATS": "formats",
    "PteResult": "executorch",
    "export_pte": "executorch",
    "run_pte": "executorch",
    "check_output_dir": "exporter",
    "export_artifacts": "exporter",
    "FORMATS": "formats",
    "SUFFIXES": "formats",
    "LoadedArtifact": "formats",
    "format_of": "formats",
    "ExportFormat": "formats",
    "FormatOption": "formats",
    "get_format": "formats",
    "list_formats": "formats",
    "register_format": "formats",
    "resolve_artifacts": "formats",
    "FP16_ATTENTION_PRECISIONS": "executorch",
    "check_attention": "executorch",
    "validate_formats": "formats",
    "load_artifact": "loader",
    "MANIFEST_VERSION": "manifest",
    "ArtifactRecord": "manifest",
    "environment": "manifest",
    "write_manifest": "manifest",
    "ONNX_OPSET": "onnx",
    "prepare_for_onnxruntime": "onnxruntime_rewrites",
    "is_patchify_conv": "patchify",
    "to_patches": "patchify",
    "optimize_for_mobile_status": "torchscript",
    "VerifyThresholds": "verify",
    "prepare_for_xnnpack": "xnnpack_rewrites",
    "register_xnnpack_rewrite": "xnnpack_rewrites",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
