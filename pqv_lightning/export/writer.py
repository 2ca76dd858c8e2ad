"""Write one file, load it back in its own runtime, verify it and record the outcome, without ever raising:
a failure in one format or precision is a record, and the others go on. :class:`ExportJob` is what one export asks
of every format module."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pqv_lightning.export.formats import get_format
from pqv_lightning.export.manifest import ArtifactRecord
from pqv_lightning.export.verify import ReferencePiece, VerifyThresholds, verify_outputs
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.io import sha256_file

if TYPE_CHECKING:
    from pqv_lightning.quantization import QuantizedModel

__all__ = ["ArtifactWriter", "ExportJob"]

log = logging.getLogger(__name__)


@dataclass
class ExportJob:
    """What one :func:`~pqv_lightning.export.export_artifacts` call asks of the format modules (each reads its own
    formats' entries).

    Attributes:
        artifacts: ``{format: precisions}`` (checked against the registry).
        options: ``{format: {option: value}}``, every option of every format in ``artifacts``.
        calibration: image batches for the calibrated precisions.
        float_layers: ``{"<format>-<precision>": layer names}`` kept in float by the quantized files.
        quantized: the post-training quantized variants (TorchScript takes the eager torch.ao / fp16 ones).
        trained: the quantization-aware-trained variants (formats with ``takes_trained`` write them).
        weights: ``{"<format>-<precision>": float model}``: the model a quantized file is built from where it is not
            the exported model (weights rounded for the file's grid, see ``ExportFormat.weight_grids``).
        shared: scratch space for formats implemented by one module (TorchScript scripts a variant once for
            ``.pt`` and ``.ptl``).
    """

    artifacts: dict[str, tuple[str, ...]]
    options: dict[str, dict[str, Any]]
    calibration: Sequence[Tensor] | None = None
    float_layers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    quantized: list[QuantizedModel] = field(default_factory=list)
    trained: list[QuantizedModel] = field(default_factory=list)
    weights: dict[str, nn.Module] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def keep(self, fmt: str, precision: str) -> tuple[str, ...]:
        """The layers the ``fmt`` file at ``precision`` keeps in float."""
        return tuple(self.float_layers.get(f"{fmt}-{precision}", ()))

    def model_for(self, fmt: str, precision: str, model: nn.Module) -> nn.Module:
        """The float model the ``fmt`` file at ``precision`` is quantized from (``model`` unless rounded for it)."""
        return self.weights.get(f"{fmt}-{precision}", model)


class ArtifactWriter:
    """The shared state of one :func:`pqv_lightning.export.export_artifacts` call and the records it made."""

    def __init__(
        self,
        out_dir: Path,
        example_input: Tensor,
        pieces: list[ReferencePiece],
        thresholds: VerifyThresholds,
        prefix: str,
        on_record: Callable[[list[ArtifactRecord]], None] | None = None,
        val_batches: Sequence[tuple[Tensor, Tensor]] = (),
    ) -> None:
        self.out_dir = out_dir
        #: the verification images (``pieces`` is their reference output; a variant verified against its own
        #: eager module swaps in its own pieces)
        self.val_batches = val_batches
        self.example_input = example_input
        self.pieces = pieces
        self.thresholds = thresholds
        self.prefix = prefix
        self.input_shape = list(example_input.shape)
        self.records: list[ArtifactRecord] = []
        self._on_record = on_record

    def _finished(self) -> None:
        """A record is final: tell ``on_record`` (e.g. rewrite the manifest, so a killed export leaves one)."""
        if self._on_record is not None:
            self._on_record(list(self.records))

    def record(self, name: str, fmt: str, precision: str, backend: str, **kw: Any) -> ArtifactRecord:
        """Add a final record (``"failed"`` unless ``status`` says otherwise) without writing a file."""
        rec = self._new_record(name, fmt, precision, backend, **kw)
        self._finished()
        return rec

    def _new_record(self, name: str, fmt: str, precision: str, backend: str, **kw: Any) -> ArtifactRecord:
        rec = ArtifactRecord(
            name=name,
            format=fmt,
            precision=precision,
            backend=backend,
            path=kw.pop("path", None),
            size_bytes=None,
            sha256=None,
            input_shape=self.input_shape,
            status=kw.pop("status", "failed"),
            **kw,
        )
        self.records.append(rec)
        return rec

    def produce(
        self,
        name: str,
        fmt: str,
        precision: str,
        backend: str,
        filename: str,
        build: Callable[[Path, dict], None],
        load: Callable[[Path], Callable[[Tensor], Tensor]],
        eager_variant: Callable[[Tensor], Tensor] | None = None,
        extra: dict | None = None,
    ) -> ArtifactRecord:
        """Write one artifact with ``build(path, extra)``, load it with ``load`` and verify; never raises."""
        path = self.out_dir / f"{self.prefix}{filename}"
        rec = self._new_record(name, fmt, precision, backend, extra=dict(extra or {}))
        stage = "export"
        files = get_format(fmt).files_of(path)
        try:
            build(path, rec.extra)
            rec.path = str(path)
            rec.size_bytes = sum(file.stat().st_size for file in files)
            rec.sha256 = sha256_file(path)
            if len(files) > 1:
                rec.extra["companions"] = {file.name: sha256_file(file) for file in files[1:]}
            stage = "load"
            run = load(path)
            stage = "verify"
            metrics, more, failure = verify_outputs(run, self.pieces, precision, self.thresholds, eager_variant)
        except Exception as e:
            rec.reason = f"{stage} failed: {error_summary(e, limit=600)}"
            rec.extra["traceback"] = traceback.format_exc(limit=-4)
            stale = [file for file in files if file.exists()] if stage == "export" else []
            for file in stale:  # a file left by an earlier run is not this model's
                file.unlink()
            if stale:
                rec.extra["removed_stale_file"] = path.name
            log.warning("%s: %s", name, rec.reason)
            self._finished()
            return rec
        for key, value in metrics.items():
            setattr(rec, key, value)
        rec.extra.update(more)
        rec.status = "ok" if failure is None else "failed"
        rec.reason = None if failure is None else f"verification failed: {failure}"
        log.info(
            "%s -> %s: %s (agreement %.4f, max|diff| %.3g, top1 %.4f)",
            name,
            path.name,
            rec.status if failure is None else rec.reason,
            metrics.get("top1_agreement", math.nan),
            metrics.get("max_abs_logit_diff", math.nan),
            metrics.get("val_top1", math.nan),
        )
        self._finished()
        return rec
