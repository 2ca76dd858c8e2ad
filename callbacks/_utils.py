"""What the pqv-lightning callbacks read from a fit: the timm model, the data loaders, the output folders."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities.model_helpers import is_overridden

from pqv_lightning.callbacks._lightning_internals import fit_data_source
from pqv_lightning.export import check_output_dir
from pqv_lightning.utils.batches import first_loader, split_batch

__all__ = [
    "check_epochs_fit_max_steps",
    "check_validation_data",
    "data_loader",
    "resolve_output_dir",
    "search_on_rank_zero",
    "take_batches",
    "timm_model_of",
    "train_loader",
]


def timm_model_of(pl_module: pl.LightningModule, attribute: str = "model", owner: str = "This callback") -> nn.Module:
    """The timm model a LightningModule exposes (the one contract the callbacks rely on)."""
    model = getattr(pl_module, attribute, None)
    if not isinstance(model, nn.Module):
        raise AttributeError(
            f"{owner} needs the LightningModule to expose its timm model as the attribute {attribute!r}; "
            f"{type(pl_module).__name__}.{attribute} is {type(model).__name__}. Set `self.{attribute} = "
            "timm.create_model(...)` in your module, or pass model_attribute=<your attribute name>."
        )
    return model


def train_loader(trainer: pl.Trainer) -> Iterable:
    """The training data loader, usable in ``setup`` (before Lightning built its own) and later."""
    if trainer.train_dataloader is not None:
        return first_loader(trainer.train_dataloader)
    loaders = fit_data_source(trainer, "train")
    if loaders is None:
        raise RuntimeError("No training data: pass a datamodule or train_dataloaders to Trainer.fit.")
    return first_loader(loaders)


def data_loader(trainer: pl.Trainer, split: str) -> Iterable:
    """The data loader of ``split`` ("train" or "val"): the datamodule's own, else the trainer's."""
    if split == "train":
        return train_loader(trainer)
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return first_loader(datamodule.val_dataloader())
    loaders = trainer.val_dataloaders
    if loaders is None:
        loaders = fit_data_source(trainer, "val")
    if not loaders:
        raise RuntimeError(
            "No validation data: give the datamodule a val_dataloader or pass val_dataloaders to Trainer.fit."
        )
    return first_loader(loaders)


def check_validation_data(trainer: pl.Trainer, owner: str) -> None:
    """Fail before training when the fit has no validation data to evaluate and verify on."""
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return
    if fit_data_source(trainer, "val") is not None:
        return
    raise ValueError(
        f"{owner} evaluates on validation data, but this fit has none: give the datamodule a val_dataloader "
        "or pass val_dataloaders to Trainer.fit."
    )


def take_batches(loader: Iterable, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` (images, labels) batches of ``loader``, on ``device``."""
    batches = [split_batch(batch) for batch in itertools.islice(iter(loader), count)]
    if not batches:
        raise RuntimeError("The training data loader yielded no batch.")
    return [(x.to(device), y.to(device)) for x, y in batches]


def search_on_rank_zero(
    trainer: pl.Trainer, search: Callable[[torch.Tensor, list[torch.Tensor]], dict[str, Any]]
) -> dict[str, Any]:
    """Run a latency search on rank 0 only (the others wait) and broadcast what it found to every rank.

    ``search(example, calibration)`` gets one training image (batch 1, CPU, float) and up to 8 single-image
    calibration batches, and returns its result as a dict. A ``ValueError`` it raises (an unreachable target) is
    re-raised on every rank, so that no rank goes on training alone.
    """
    outcome: dict[str, Any] | str | None = None
    if trainer.is_global_zero:
        images = take_batches(train_loader(trainer), 1, torch.device("cpu"))[0][0].float()
        calibration = [images[i : i + 1] for i in range(min(8, images.shape[0]))]
        try:
            outcome = search(images[:1], calibration)
        except ValueError as err:
            outcome = str(err)
    outcome = trainer.strategy.broadcast(outcome, src=0)
    if isinstance(outcome, str):
        raise ValueError(outcome)
    return outcome


def check_epochs_fit_max_steps(trainer: pl.Trainer, epochs: int, argument: str, minimum: int) -> None:
    """Raise ValueError when a ``max_steps`` budget ends before ``epochs`` epochs leave a step of training after them.

    For callbacks that prune after ``epochs`` epochs (``argument`` names their setting, ``minimum`` its lowest
    accepted value). Call it in ``on_train_start``: only then are the training batches per epoch known. Steps and
    epochs count from the start of the run, so a resumed run is checked the same way. Runs without ``max_steps``,
    or with epochs of unknown length, pass.
    """
    max_steps, batches = trainer.max_steps, trainer.num_training_batches
    if max_steps is None or max_steps < 0 or not math.isfinite(batches) or batches < 1:
        return
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    needed = epochs * per_epoch
    if needed < max_steps:
        return
    latest = (max_steps - 1) // per_epoch
    accepted = f"{minimum} <= {argument} <= {latest}, or " if latest >= minimum else ""
    raise ValueError(
        f"{argument}={epochs} needs {needed} training steps ({per_epoch} an epoch) before pruning, but "
        f"max_steps={max_steps}: pruning would never happen or leave no finetuning. "
        f"Accepted: {accepted}max_steps > {needed}."
    )


def resolve_output_dir(trainer: pl.Trainer, configured: Path | None, default_name: str) -> Path:
    """``configured``, else ``<trainer.log_dir>/<default_name>``; checked writable on rank 0 before training.

    Every rank must call it (``trainer.log_dir`` is collective) and every rank raises when the folder is
    unusable, so no rank trains on while another stopped.
    """
    log_dir = trainer.log_dir
    resolved = configured or Path(log_dir or trainer.default_root_dir) / default_name
    problem = None
    if trainer.is_global_zero:
        try:
            check_output_dir(resolved)
        except OSError as err:
            problem = err
    problem = trainer.strategy.broadcast(problem, src=0)
    if problem is not None:
        raise problem
    return resolved
