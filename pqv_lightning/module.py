"""``ViTClassifier``: a LightningModule around a timm vision transformer chosen by name.

The wrapped timm model is the attribute :attr:`ViTClassifier.model`. That attribute is the whole contract the
pqv-lightning callbacks rely on: a LightningModule of your own works with them as long as it keeps its timm
model in ``self.model``.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.optim import param_groups_weight_decay
from torchmetrics.classification import MulticlassAccuracy

from pqv_lightning.checkpoint import read_checkpoint, restore_pruned_structure, restore_token_reduction
from pqv_lightning.distillation import distill
from pqv_lightning.models import create_timm_model
from pqv_lightning.safe_loading import load_weights_only
from pqv_lightning.utils.checks import check_int, check_number

__all__ = ["ViTClassifier", "restarted_warmup_cosine", "warmup_cosine"]

#: Set while :meth:`ViTClassifier.from_checkpoint` builds the module: the start weights are not fetched again.
_RESTORING: contextvars.ContextVar[bool] = contextvars.ContextVar("pqv_restoring_checkpoint", default=False)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_factor`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def restarted_warmup_cosine(
    step: int, starts: tuple[int, ...], total_steps: int, warmup_steps: int, min_factor: float
) -> float:
    """:func:`warmup_cosine` started again at each of ``starts`` (steps, the first 0): every cycle warms up
    (at most half of it) and decays to ``min_factor`` by its own end."""
    begin = max(s for s in starts if s <= step)
    end = min((s for s in starts if s > step), default=total_steps)
    length = max(1, end - begin)
    return warmup_cosine(step - begin, min(warmup_steps, length // 2), length, min_factor)


class ViTClassifier(pl.LightningModule):
    """Image classification with a timm model, trained the Lightning way.

    Args:
        model_name: timm architecture, e.g. ``"deit_small_patch16_224"`` (unknown names fail with suggestions).
        num_classes: number of classes; must match the data module's.
        pretrained: load timm's released weights for ``model_name`` (a download, then the Hugging Face cache;
            ``HF_HUB_OFFLINE=1``: the cache only). Weights neither cached nor downloadable fail at once, naming
            ``checkpoint_path`` as the local alternative.
        checkpoint_path: start from a local file instead: a timm ``.safetensors`` / ``.pth`` / ``.bin``, or a
            Lightning ``.ckpt`` of a dense ``ViTClassifier`` (your own finetune), whose weights then start a NEW run
            (e.g. a pruning run: ``--model.init_args.checkpoint_path=last.ckpt``); to continue that run instead,
            pass it as ``ckpt_path`` (``--ckpt_path``). Another class count re-initialises the classifier with a
            warning; another width is refused. See :func:`pqv_lightning.models.create_timm_model`.
        model_kwargs: timm keyword arguments: ``img_size``, ``patch_size``, ``in_chans``, ``depth``,
            ``embed_dim``, ``num_heads``, ``drop_path_rate``, ...
        lr: peak learning rate of the default AdamW.
        weight_decay: AdamW weight decay (not applied to biases, norms and position/class tokens, as in timm).
        warmup_epochs: linear warm-up length (fractions allowed), then cosine decay to ``min_lr``.
        min_lr: final learning rate of the cosine schedule.
        label_smoothing: label smoothing of the cross-entropy loss.
        optimizer: replaces the default AdamW (LightningCLI: ``--model.optimizer=SGD --model.optimizer.lr=...``).
        lr_scheduler: replaces the default warm-up + cosine schedule (stepped every epoch).
        restart_epochs: epochs at which the default schedule starts again with its warm-up and cosine decay,
            e.g. the pruning epoch of ``StructuredPruning(at_epoch=K)``: the dense model is annealed (converged)
            when it is pruned and becomes the teacher, and the finetune gets a schedule of its own.
    """

    #: The training loss goes through ``pqv_lightning.distillation.distill`` (KnowledgeDistillation works).
    supports_distillation = True

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 1000,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        restart_epochs: list[int] | None = None,
    ) -> None:
        super().__init__()
        for i, epoch in enumerate(restart_epochs or ()):
            check_int(f"restart_epochs[{i}]", epoch, 1)
        check_number("lr", lr, 0, min_open=True)
        check_number("weight_decay", weight_decay, 0)
        check_number("warmup_epochs", warmup_epochs, 0)
        check_number("min_lr", min_lr, 0)
        check_number("label_smoothing", label_smoothing, 0, 1, max_open=True)
        # Callables are not hyperparameters: they would make the checkpoint need unpickling to load.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        restoring = _RESTORING.get()  # from_checkpoint: the checkpoint's weights replace the start weights
        self.model = create_timm_model(
            model_name,
            num_classes=num_classes,
            pretrained=pretrained and not restoring,
            checkpoint_path=None if restoring else checkpoint_path,
            **(model_kwargs or {}),
        )
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")
                for stage in ("train", "val", "test")
                for name, k in (("top1", 1), ("top5", top_k))
            }
        )

    @property
    def num_classes(self) -> int:
        return int(self.hparams.num_classes)

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            load_weights_only(self._trainer)  # before Lightning restores ckpt_path, whatever the path
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        try:
            data_classes = getattr(datamodule, "num_classes", None)
        except RuntimeError:  # a data module that only knows its classes after its own setup
            data_classes = None
        if data_classes is not None and int(data_classes) != self.num_classes:
            raise ValueError(
                f"The data has {data_classes} classes but the model has num_classes={self.num_classes}: "
                "set model.num_classes to the data set's class count."
            )
        self._check_image_shape(getattr(datamodule, "image_shape", None))

    def _check_image_shape(self, data_shape: tuple[int, int, int] | None) -> None:
        """Refuse data images of another size or channel count than a fixed-size model takes, naming both
        settings (timm would fail later, inside the sanity check's first forward)."""
        embed = getattr(self.model, "patch_embed", None)
        size, proj = getattr(embed, "img_size", None), getattr(embed, "proj", None)
        if data_shape is None or size is None or not getattr(embed, "strict_img_size", True):
            return
        if getattr(embed, "dynamic_img_size", False):
            return
        channels = proj.in_channels if isinstance(proj, nn.Conv2d) else data_shape[0]
        model_shape = (channels, *tuple(size))
        if tuple(data_shape) != model_shape:
            raise ValueError(
                f"The data gives {data_shape[0]}-channel {data_shape[1]}x{data_shape[2]} images but the model takes "
                f"{model_shape[0]}-channel {model_shape[1]}x{model_shape[2]} ones: set data.init_args.img_size / "
                "in_chans and model.init_args.model_kwargs.img_size / in_chans to the same values."
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"The data has label {int(labels.max())} but the model has num_classes={self.num_classes}: "
                "set model.num_classes to the data set's class count."
            )

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        self._check_labels(labels)
        logits = self(images)
        loss = self.classification_loss(logits, labels)
        if stage == "train":
            loss = distill(self, images, logits, loss)
        batch_size = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=batch_size, sync_dist=stage != "train")
        for name in ("top1", "top5"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(logits.detach(), labels)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "top1", batch_size=batch_size)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probabilities = self(images).softmax(dim=-1)
        return {"probabilities": probabilities, "prediction": probabilities.argmax(dim=-1)}

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(self.parameters())
        else:
            groups = param_groups_weight_decay(self.model, weight_decay=self.hparams.weight_decay)
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        if self.lr_scheduler_factory is not None:
            return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._default_scheduler(optimizer), "interval": "step"},
        }

    def _default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up then cosine decay (again from each of ``restart_epochs``), stepped every optimizer step."""
        trainer = self.trainer
        total = max(1, int(trainer.estimated_stepping_batches))
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        warmup = round(total * self.hparams.warmup_epochs / max_epochs)
        min_factor = min(1.0, self.hparams.min_lr / self.hparams.lr)
        restarts = sorted({e for e in self.hparams.get("restart_epochs") or () if e < max_epochs})
        if not restarts:
            schedule = functools.partial(warmup_cosine, warmup_steps=warmup, total_steps=total, min_factor=min_factor)
        else:
            starts = (0, *(round(total * e / max_epochs) for e in restarts))
            schedule = functools.partial(
                restarted_warmup_cosine, starts=starts, total_steps=total, warmup_steps=warmup, min_factor=min_factor
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the state dict is loaded (load_from_checkpoint and trainer.fit(ckpt_path=...)):
        # rebuild a pruned architecture and the token reduction from the data stored in the checkpoint.
        restore_pruned_structure(self.model, checkpoint)
        restore_token_reduction(self.model, checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> ViTClassifier:
        """``load_from_checkpoint`` with ``weights_only=True`` and on CPU: nothing in the file is unpickled. A file
        that is no checkpoint (empty, truncated, not torch's) is refused first, saying which.

        The run's start weights (``pretrained``, ``checkpoint_path``) are not fetched again: the checkpoint holds
        every weight, so it loads offline and after the start file is gone; its hyper-parameters still name them."""
        read_checkpoint(path, "a Lightning checkpoint of ViTClassifier", mmap=True)
        token = _RESTORING.set(True)
        try:
            return cls.load_from_checkpoint(os.fspath(path), map_location="cpu", weights_only=True, **kwargs)
        finally:
            _RESTORING.reset(token)
