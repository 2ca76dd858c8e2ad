"""``KnowledgeDistillation``: finetune a (pruned) student against a frozen teacher."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from pqv_lightning.callbacks._utils import timm_model_of
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.distillation import (
    OPT_IN_ATTRIBUTE,
    Distiller,
    attach_distiller,
    detach_distiller,
    frozen_copy,
    load_teacher,
    output_classes,
    validate,
)

__all__ = ["KnowledgeDistillation"]


class KnowledgeDistillation(Callback):
    """Adds a distillation term from a frozen teacher to the training loss.

    ``loss = (1 - alpha) * label_loss + alpha * term``, with ``term`` the soft KL(teacher/T || student/T) * T^2
    (``mode="soft"``) or DeiT's hard distillation, cross-entropy on the teacher's argmax (``mode="hard"``).

    The teacher, by default, is the model exactly as it was before :class:`StructuredPruning` changed it (captured
    whatever the order of the two callbacks; without a pruning callback, the model as it is at fit start). It can
    also be a ``ViTClassifier`` checkpoint (``.ckpt``), a timm state-dict file (``teacher_kwargs`` names the
    architecture) or a timm model name (released weights). It stays in eval mode without gradients, outside the
    LightningModule (no optimizer, no DDP, not in the student's checkpoint); a teacher captured during the run is
    kept in this callback's state so a resumed run distils from the same teacher.

    The module's training step must route its loss through ``pqv_lightning.distillation.distill`` and declare
    ``supports_distillation = True`` (``ViTClassifier`` does both); see :mod:`pqv_lightning.distillation`.

    Args:
        teacher: ``None`` (the dense model), a checkpoint / state-dict path, or a timm model name.
        teacher_kwargs: for a state-dict file: ``model_name``, ``num_classes`` and timm kwargs; for a timm name:
            ``num_classes`` and timm kwargs.
        mode: ``"soft"`` or ``"hard"``.
        temperature: softmax temperature of the soft term (> 0).
        alpha: weight of the distillation term, in [0, 1].
        model_attribute: attribute of the LightningModule holding the timm model.
    """

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
            raise ValueError(
                f"teacher={teacher!r} is invalid; accepted: None (the dense model), a checkpoint path or a timm name."
            )
        if not isinstance(model_attribute, str) or not model_attribute.isidentifier():
            raise ValueError(f"model_attribute={model_attribute!r} is invalid; accepted: an attribute name.")
        self.teacher_source = teacher
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.mode, self.temperature, self.alpha = mode, float(temperature), float(alpha)
        self.model_attribute = model_attribute
        self.distiller: Distiller | None = None
        self._captured = False  # teacher copied from this run's model (kept in state_dict for resume)
        self._restored_teacher: dict[str, torch.Tensor] | None = None
        self._placeholder: tuple[nn.Module, nn.Module, pl.LightningModule] | None = None

    @property
    def teacher(self) -> nn.Module | None:
        return self.distiller.teacher if self.distiller is not None else None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, OPT_IN_ATTRIBUTE, False) is not True:
            raise TypeError(
                f"KnowledgeDistillation: {type(pl_module).__name__} has not opted in to distillation. In its "
                "training_step, return `pqv_lightning.distillation.distill(self, images, logits, loss)` instead of "
                f"`loss`, and set the class attribute `{OPT_IN_ATTRIBUTE} = True` (ViTClassifier does both)."
            )
        student = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        if self.teacher_source is not None:
            self._use(load_teacher(self.teacher_source, self.teacher_kwargs), student, pl_module)
            return
        pruning = [cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning)]
        if pruning and current_structure(student) is None:
            pruning[0].on_dense_model(lambda dense: self._capture(dense, student, pl_module))
            # A resumed run may be past pruning: its teacher then comes from the checkpoint (load_state_dict),
            # loaded into this dense copy. Lightning restores checkpoints after setup; dropped at fit start.
            self._placeholder = (frozen_copy(student), student, pl_module)
        elif pruning:
            # The pruning callback came first in the list and already pruned in its setup: its dense backup
            # (kept until fit start for resume) is the model exactly as it was before pruning.
            dense = pruning[0].dense_model
            if dense is None:
                raise RuntimeError(
                    "KnowledgeDistillation: the model was pruned before the teacher could be captured; list "
                    "KnowledgeDistillation before StructuredPruning or pass teacher=<checkpoint>."
                )
            self._capture(dense, student, pl_module)
        else:
            self._capture(student, student, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        placeholder, self._placeholder = self._placeholder, None
        if self.distiller is None and self._restored_teacher is not None and placeholder is not None:
            self._capture(*placeholder)
        if self.distiller is None:
            return
        if self._restored_teacher is not None:
            self.distiller.teacher.load_state_dict(self._restored_teacher)
            self._restored_teacher = None
        self.distiller.to(pl_module.device)

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

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach_distiller(pl_module)

    def state_dict(self) -> dict[str, Any]:
        if not self._captured or self.distiller is None:
            return {}
        return {"teacher": {k: v.detach().cpu() for k, v in self.distiller.teacher.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run distils from the teacher of the original run, not from whatever the model is at setup.
        self._restored_teacher = state_dict.get("teacher")

    # ------------------------------------------------------------------ internals
    def _capture(self, dense: nn.Module, student: nn.Module, pl_module: pl.LightningModule) -> None:
        self._captured = True
        self._use(frozen_copy(dense), student, pl_module)

    def _use(self, teacher: nn.Module, student: nn.Module, pl_module: pl.LightningModule) -> None:
        t_classes, s_classes = output_classes(teacher), output_classes(student)
        if t_classes is not None and s_classes is not None and t_classes != s_classes:
            raise ValueError(
                f"The teacher predicts {t_classes} classes but the student {s_classes}: distillation needs the "
                "same classes; pass a teacher trained on this data set."
            )
        self.distiller = Distiller(teacher, self.mode, self.temperature, self.alpha)
        attach_distiller(pl_module, self.distiller)
        rank_zero_info(
            f"KnowledgeDistillation: {self.mode} (T={self.temperature:g}, alpha={self.alpha:g}) from "
            f"{self.teacher_source or 'the dense model'} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.3f}M "
            "parameters)"
        )
