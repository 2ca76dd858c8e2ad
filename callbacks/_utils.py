"""Small helpers shared by the pqv-lightning callbacks."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn


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


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a batch given as a tuple/list or a dict with image/label keys."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for image_key, label_key in (("image", "label"), ("pixel_values", "labels"), ("images", "labels")):
            if image_key in batch and label_key in batch:
                return batch[image_key], batch[label_key]
    raise TypeError(
        f"Cannot read (images, labels) from a batch of type {type(batch).__name__}: use (images, labels) "
        "tuples or dicts with 'image'/'label' keys."
    )


def first_loader(loaders: Any) -> Iterable:
    """The first data loader of what Lightning holds (a loader, a list or a dict of loaders)."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0]
    if isinstance(loaders, dict):
        return next(iter(loaders.values()))
    return loaders


def train_loader(trainer: pl.Trainer) -> Iterable:
    """The training data loader, usable in ``setup`` (before Lightning built its own) and later."""
    if trainer.train_dataloader is not None:
        return first_loader(trainer.train_dataloader)
    source = trainer.fit_loop._data_source  # set by Trainer.fit before any hook runs
    if not source.is_defined():
        raise RuntimeError("No training data: pass a datamodule or train_dataloaders to Trainer.fit.")
    return first_loader(source.dataloader())


def take_batches(loader: Iterable, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` (images, labels) batches of ``loader``, on ``device``."""
    batches = [split_batch(batch) for batch in itertools.islice(iter(loader), count)]
    if not batches:
        raise RuntimeError("The training data loader yielded no batch.")
    return [(x.to(device), y.to(device)) for x, y in batches]
