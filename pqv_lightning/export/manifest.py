"""One row per exported file, and the manifest that lists them with the library versions that made them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pqv_lightning.utils.io import write_json

__all__ = ["MANIFEST_VERSION", "ArtifactRecord", "environment", "write_manifest"]

#: 2: ``meta`` names the files as ``artifacts`` ({format: precisions}) and ``options`` ({format: {option: value}})
#: instead of ``formats`` and one ``<format>_precisions`` key per format.
MANIFEST_VERSION = 2
_ENVIRONMENT_PACKAGES = ("torch", "executorch", "onnx", "onnxruntime", "timm")


@dataclass
class ArtifactRecord:
    """One exported file (one manifest row). ``status`` is ``"ok"``, ``"failed"`` or ``"skipped"``."""

    name: str
    format: str
    precision: str
    backend: str
    path: str | None
    size_bytes: int | None
    sha256: str | None
    input_shape: list[int]
    status: str
    reason: str | None = None
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def engine(self) -> str | None:
        """The ``torch.backends.quantized`` engine this TorchScript/lite file was packed for (its backend, for
        torch.ao INT8 files), which its runtime needs set too; ``None`` for every other file."""
        from pqv_lightning.quantization import LEGACY_ENGINES

        if self.format in ("torchscript", "lite") and self.backend in LEGACY_ENGINES:
            return self.backend
        return None


def environment() -> dict[str, str]:
    """Installed versions of the packages that write and run the files (absent ones left out)."""
    from importlib import metadata

    env = {}
    for pkg in _ENVIRONMENT_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[pkg] = metadata.version(pkg)
    return env


def write_manifest(records: Sequence[ArtifactRecord], path: str | os.PathLike, meta: dict) -> None:
    """Write the records as JSON, atomically. Artifact paths inside the manifest's folder are stored relative
    to it, so the folder can be moved as a whole."""
    path = Path(path)
    rows = []
    for rec in records:
        row = asdict(rec)
        row["extra"] = {k: v for k, v in row["extra"].items() if k != "traceback"}
        if rec.path is not None:
            with contextlib.suppress(ValueError):
                row["path"] = Path(rec.path).resolve().relative_to(path.parent.resolve()).as_posix()
        rows.append(row)
    doc = {"manifest_version": MANIFEST_VERSION, "meta": meta, "environment": environment(), "artifacts": rows}
    write_json(path, doc)
