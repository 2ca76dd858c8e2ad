"""Write one file, load it back in its own runtime, verify it and record the outcome, without ever raising:
a failure in one format or precision is a record, and the others go on."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from pqv_lightning.export.manifest import ArtifactRecord
from pqv_lightning.export.verify import ReferencePiece, VerifyThresholds, verify_outputs
from pqv_lightning.utils.errors import error_summary
from pqv_lightning.utils.io import sha256_file

__all__ = ["ArtifactWriter"]

log = logging.getLogger(__name__)


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
    ) -> None:
        self.out_dir = out_dir
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
        try:
            build(path, rec.extra)
            rec.path = str(path)
            rec.size_bytes = path.stat().st_size
            rec.sha256 = sha256_file(path)
            stage = "load"
            run = load(path)
            stage = "verify"
            metrics, more, failure = verify_outputs(run, self.pieces, precision, self.thresholds, eager_variant)
        except Exception as e:
            rec.reason = f"{stage} failed: {error_summary(e, limit=600)}"
            rec.extra["traceback"] = traceback.format_exc(limit=-4)
            if stage == "export" and path.exists():  # a file left by an earlier run is not this model's
                path.unlink()
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
