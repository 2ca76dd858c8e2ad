"""Reading ``(images, labels)`` batches from whatever a data loader yields: tuples, lists or dicts."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["collect_batches", "collect_images", "first_loader", "images_of", "split_batch"]

_DICT_KEYS = (("image", "label"), ("pixel_values", "labels"), ("images", "labels"))


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a batch given as a tuple/list or a dict with image/label keys."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for image_key, label_key in _DICT_KEYS:
            if image_key in batch and label_key in batch:
                return batch[image_key], batch[label_key]
    raise TypeError(
        f"Cannot read (images, labels) from a batch of type {type(batch).__name__}: use (images, labels) "
        "tuples or dicts with 'image'/'label' keys."
    )


def images_of(batch: Any) -> torch.Tensor:
    """The images of a batch: a tensor of images as it is, or the first item of an ``(images, labels, ...)`` batch."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"Expected a Tensor of images or an (images, labels) batch, got {type(batch).__name__}.")
    return batch


def first_loader(loaders: Any) -> Iterable:
    """The first data loader of what a trainer holds (a loader, a list or a dict of loaders)."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0]
    if isinstance(loaders, dict):
        return next(iter(loaders.values()))
    return loaders


def collect_batches(loader: Iterable, count: int | None, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` (all if None) ``(images, labels)`` batches of ``loader``, as float32 CPU tensors."""
    batches = []
    for batch in itertools.islice(iter(loader), count):
        images, labels = split_batch(batch)
        batches.append((images.detach().cpu().float(), labels.detach().cpu()))
    if not batches:
        raise RuntimeError(f"The {what} data loader yielded no batch.")
    return batches


def collect_images(batches: Iterable[Any], count: int | None, why: str) -> list[torch.Tensor]:
    """The images of the first ``count`` (all if None) batches (image tensors or ``(images, labels)`` batches), as
    float32 CPU tensors; a ``ValueError`` saying ``why`` they are needed when there is none."""
    images = [images_of(batch).detach().cpu().float() for batch in itertools.islice(iter(batches), count)]
    if not images:
        raise ValueError(f"{why}: zero calibration batches given.")
    return images
