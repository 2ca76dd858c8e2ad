"""``KnowledgeDistillation``: finetune a (pruned) student against a frozen teacher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from pqv_lightning.callbacks._utils import timm_model_of
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.distillation import (
    OPT_IN_ATTRIBUTE,
    Distiller,
    attach_distiller,
    detach_distiller,
    frozen_copy,
    load_teacher,
    load_teacher_state,
    output_classes,
    save_teacher_state,
    validate,
)
from pqv_lightning.safe_loading import load_weights_only
from pqv_lightning.utils.checks import check_identifier, invalid

__all__ = ["KnowledgeDistillation"]


class KnowledgeDistillation(Callback):
    """Adds a distillation term from a frozen teacher to the training loss.

    ``loss = (1 - alpha) * label_loss + alpha * term``, with ``term`` the soft KL(teacher/T || student/T) * T^2
    (``mode="soft"``) or DeiT's hard distillation, cross-entropy on the teacher's argmax (``mode="hard"``).

    The teacher, by default, is the model exactly as it was before a shape-changing callback
    (:class:`StructuredPruning`, :class:`SparsityGates`: any :class:`ShapeChangingCallback`) changed it, captured
    whatever the order of the callbacks; without one, the model as it is at fit start. Until the change (pruning at
    epoch K, gates at ``prune_epoch``) the loss is the label loss alone. It can
    also be a ``ViTClassifier`` checkpoint (``.ckpt``), a timm state-dict file (``teacher_kwargs`` names the
    architecture) or a timm model name (released weights). It stays in eval mode without gradients, outside the
    LightningModule: in no optimizer, not wrapped by DDP, and not in any checkpoint.

    A teacher captured during the run exists nowhere else, so it is written once, by global rank 0 and atomically,
    to ``<trainer.log_dir>/distillation/teacher-<sha256 prefix>.pt`` (at fit start, or when pruning at epoch K
    captures it); checkpoints keep only this callback's state: the file's path, its sha256 and the teacher's
    parameter and class counts. A resumed run loads the file on every rank (``weights_only=True``; it must be
    readable there, like the checkpoint) and checks its sha256 at fit start, before any training step: a missing
    or different file is an error naming it (restore the file, or pass ``teacher=<checkpoint of the dense
    model>``). The file is looked for where it was written, then as ``distillation/<name>`` under the resumed
    checkpoint's folder and its two parents (a moved run directory). With ``teacher=<file or name>`` nothing is
    written, and an explicit teacher wins over a recorded one.

    The module's training step must route its loss through ``pqv_lightning.distillation.distill`` and declare
    ``supports_distillation = True`` (``ViTClassifier`` does both); see :mod:`pqv_lightning.distillation`.

    Args:
        teacher: ``None`` (the dense model), a checkpoint / state-dict path, or a timm model name.
        teacher_kwargs: for a state-dict file: ``model_name``, ``num_classes`` and timm kwargs; for a timm name:
            ``num_classes`` and timm kwargs.
        mode: ``"soft"`` or ``"hard"``.
        temperature: softmax temperature of the soft term (finite, > 0).
        alpha: weight of the distillation term, in [0, 1].
        model_attribute: attribute of the LightningModule holding the timm model.
    """

    #: Folder under ``trainer.log_dir`` that holds captured teachers.
    FOLDER = "distillation"

    def __init__(
        self,
        teacher: str | os.PathLike | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        mode: str = "soft",
        temperature: float = 4.0,
        alpha: float = 0.5,
        model_attribute: str = "model",
    ) -> None:
        super().__init__()
        validate(mode, temperature, alpha)
        if teacher is not None and not isinstance(teacher, (str, os.PathLike)):
            raise invalid("teacher", teacher, "None (the dense model), a checkpoint path or a timm name")
        check_identifier("model_attribute", model_attribute)
        self.teacher_source = teacher
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.mode, self.temperature, self.alpha = mode, float(temperature), float(alpha)
        self.model_attribute = model_attribute
        self.distiller: Distiller | None = None
        self._reset()

    def _reset(self) -> None:
        self._directory: Path | None = None  # where a captured teacher is written (resolved in setup)
        self._record: dict[str, Any] | None = None  # the teacher file's path, sha256 and counts (plain data)
        self._restored: dict[str, Any] | None = None  # this callback's state in the checkpoint a fit resumes
        self._settled = False  # the teacher of this fit is final (restored or written)
        self._placeholder: tuple[nn.Module, nn.Module, pl.LightningModule] | None = None
        self._trainer: pl.Trainer | None = None
        self._training = False  # past on_train_start: a teacher captured now is written at once

    @property
    def teacher(self) -> nn.Module | None:
        return self.distiller.teacher if self.distiller is not None else None

    @property
    def teacher_file(self) -> Path | None:
        """The file holding the teacher captured (or restored) in this run, once written."""
        return Path(self._record["path"]) if self._record is not None else None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        load_weights_only(trainer)
        if getattr(pl_module, OPT_IN_ATTRIBUTE, False) is not True:
            raise TypeError(
                f"KnowledgeDistillation: {type(pl_module).__name__} has not opted in to distillation. In its "
                "training_step, return `pqv_lightning.distillation.distill(self, images, logits, loss)` instead of "
                f"`loss`, and set the class attribute `{OPT_IN_ATTRIBUTE} = True` (ViTClassifier does both)."
            )
        student = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        self._reset()
        self.distiller = None
        if self.teacher_source is not None:
            self._use(load_teacher(self.teacher_source, self.teacher_kwargs), student, pl_module)
            return
        log_dir = trainer.log_dir  # a collective call: every rank makes it
        self._directory = Path(os.path.abspath(log_dir or trainer.default_root_dir)) / self.FOLDER
        self._trainer = trainer
        changers = [cb for cb in trainer.callbacks if isinstance(cb, ShapeChangingCallback)]
        if not changers:
            self._capture(student, student, pl_module)
            return
        changed_already = current_structure(student) is not None
        # A change made in that callback's setup (listed before this one) is replayed to us at once.
        changers[0].before_shape_change.subscribe(lambda dense: self._capture(dense, student, pl_module))
        if self.distiller is None and changed_already:
            raise RuntimeError(
                "KnowledgeDistillation: the model was pruned before the teacher could be captured; list "
                "KnowledgeDistillation before StructuredPruning or pass teacher=<checkpoint>."
            )
        if self.distiller is None:
            # A resumed run may be past pruning: its teacher then comes from the checkpoint's teacher file
            # (load_state_dict), loaded into this dense copy. Lightning restores checkpoints after setup.
            self._placeholder = (frozen_copy(changers[0].dense_copy(student)), student, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.strategy.restore_checkpoint_after_setup:  # the checkpoint, if any, is restored by now
            self._settle(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle(trainer, pl_module)
        self._training = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        distiller = self.distiller
        if distiller is None:
            return
        if distiller.calls == 0:
            raise RuntimeError(
                f"KnowledgeDistillation: {type(pl_module).__name__}.training_step did not call "
                "pqv_lightning.distillation.distill(self, images, logits, loss); no distillation happened."
            )
        if distiller.last_term is not None:
            pl_module.log("train/distill_term", distiller.last_term, batch_size=1)
        distiller.calls = 0

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach_distiller(pl_module)
        self._trainer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data only: the teacher file's record, or the configured teacher source; never a tensor."""
        if self._record is not None:
            return dict(self._record)
        if self.teacher_source is not None and self.distiller is not None:
            return {"source": os.fspath(self.teacher_source)}
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run distils from the teacher of the original run, not from whatever the model is at setup;
        # an explicit teacher=... replaces it (the way out when the file is lost). Checked once the fit starts.
        if self.teacher_source is None and ("sha256" in state_dict or "teacher" in state_dict):
            self._restored = state_dict

    # ------------------------------------------------------------------ internals
    def _settle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once every checkpoint is restored: the resumed run's teacher (its file loaded and checked on every
        rank), else the teacher captured so far written to its file (rank 0)."""
        if self._settled:
            return
        self._settled = True
        placeholder, self._placeholder = self._placeholder, None
        restored, self._restored = self._restored, None
        if restored is not None:
            if "sha256" in restored:
                record = {key: restored[key] for key in ("path", "relative", "sha256", "parameters", "classes")}
                found, weights = self._read_teacher_file(record, trainer.ckpt_path)
                record["path"] = os.fspath(found)  # where it is now: this run's checkpoints point there
                rank_zero_info(f"KnowledgeDistillation: resuming with the teacher in {found} (sha256 checked)")
            else:  # written before teachers became side files: the weights are inline, and go to a file below
                record, weights = None, restored["teacher"]
            if self.distiller is None:  # resumed past pruning: the dense copy made in setup takes the weights
                self._use(*placeholder)
            self._load_weights(self.distiller.teacher, record, weights)
            self._record = record
        elif self.distiller is None and placeholder is not None and current_structure(placeholder[1]) is not None:
            raise ValueError(
                "KnowledgeDistillation: the resumed checkpoint is already pruned but records no teacher (it was "
                "written without KnowledgeDistillation), so the dense model to distil from is gone. Accepted: "
                "teacher=<checkpoint of the dense model> (or a timm name), or resume without KnowledgeDistillation."
            )
        if self.distiller is not None and self._directory is not None and self._record is None:
            self._write_teacher(trainer)
        if self.distiller is not None:  # where the student is, in its dtype (bf16-true, 64-true convert it)
            student = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
            param = next(student.parameters(), None)
            dtype = param.dtype if param is not None and param.is_floating_point() else None
            self.distiller.to(pl_module.device, dtype)

    def _capture(self, dense: nn.Module, student: nn.Module, pl_module: pl.LightningModule) -> None:
        if self._record is not None:
            return  # this run distils from the resumed run's teacher
        self._use(frozen_copy(dense), student, pl_module)
        if self._training:  # captured mid-fit (pruning at epoch K), on every rank at the same point
            self._write_teacher(self._trainer)

    def _use(self, teacher: nn.Module, student: nn.Module, pl_module: pl.LightningModule) -> None:
        t_classes, s_classes = output_classes(teacher), output_classes(student)
        if t_classes is not None and s_classes is not None and t_classes != s_classes:
            raise ValueError(
                f"The teacher predicts {t_classes} classes but the student {s_classes}: distillation needs the "
                f"same classes; accepted: a teacher with {s_classes} classes, trained on this data set."
            )
        self.distiller = Distiller(teacher, self.mode, self.temperature, self.alpha)
        attach_distiller(pl_module, self.distiller)
        rank_zero_info(
            f"KnowledgeDistillation: {self.mode} (T={self.temperature:g}, alpha={self.alpha:g}) from "
            f"{self.teacher_source or 'the dense model'} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.3f}M "
            "parameters)"
        )

    def _write_teacher(self, trainer: pl.Trainer) -> None:
        """Global rank 0 writes the teacher file; every rank gets its record (or rank 0's error) by broadcast."""
        teacher = self.distiller.teacher
        outcome: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                path, sha256 = save_teacher_state(teacher, self._directory)
                outcome = {
                    "path": os.fspath(path),
                    "relative": f"{self.FOLDER}/{path.name}",
                    "sha256": sha256,
                    "parameters": sum(p.numel() for p in teacher.parameters()),
                    "classes": output_classes(teacher),
                }
            except OSError as e:
                outcome = {"error": f"{type(e).__name__}: {e}"}
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if "error" in outcome:
            raise OSError(
                f"KnowledgeDistillation: could not write the teacher to {os.fspath(self._directory)!r} "
                f"({outcome['error']}); a resumed run needs it. Make that folder writable (it is under "
                "trainer.log_dir) or pass teacher=<checkpoint>."
            )
        self._record = outcome
        rank_zero_info(f"KnowledgeDistillation: teacher saved to {outcome['path']} (checkpoints keep its sha256)")

    @staticmethod
    def _candidates(record: dict[str, Any], ckpt_path: str | os.PathLike | None) -> list[Path]:
        """Where the teacher file may be: where it was written, else in the resumed checkpoint's run folder."""
        paths = [Path(record["path"])]
        if ckpt_path is not None and os.path.isfile(ckpt_path):
            folder = Path(os.path.abspath(ckpt_path)).parent
            paths += [base / record["relative"] for base in (folder, *list(folder.parents)[:2])]
        return list(dict.fromkeys(paths))

    def _read_teacher_file(
        self, record: dict[str, Any], ckpt_path: str | os.PathLike | None
    ) -> tuple[Path, dict[str, torch.Tensor]]:
        candidates = self._candidates(record, ckpt_path)
        found = next((path for path in candidates if path.is_file()), None)
        remedy = (
            "Restore that file (it holds the teacher this run distils from; checkpoints keep only its path and "
            "sha256), or pass teacher=<checkpoint of the dense model> to KnowledgeDistillation."
        )
        if found is None:
            looked = ", ".join(repr(os.fspath(path)) for path in candidates)
            raise FileNotFoundError(
                f"KnowledgeDistillation: the resumed checkpoint's teacher file {record['path']!r} is missing "
                f"(looked at {looked}). {remedy}"
            )
        try:
            return found, load_teacher_state(found, record["sha256"])
        except ValueError as e:
            raise ValueError(
                f"KnowledgeDistillation: the teacher file {os.fspath(found)!r} is not the one the resumed "
                f"checkpoint recorded ({e}). {remedy}"
            ) from None

    @staticmethod
    def _load_weights(teacher: nn.Module, record: dict[str, Any] | None, weights: dict[str, torch.Tensor]) -> None:
        try:
            teacher.load_state_dict(weights)
        except RuntimeError as e:
            where = (
                f"teacher file {record['path']!r} ({record['parameters']} parameters, {record['classes']} classes)"
                if record is not None
                else "checkpoint's teacher"
            )
            raise RuntimeError(
                f"KnowledgeDistillation: the {where} does not fit this run's dense model: resume with the model "
                f"configuration of the original run, or pass teacher=<checkpoint>. {e}"
            ) from None
