"""The one ``DataLoader`` recipe of the data modules: per-process batches, persistent workers when there are any."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["make_loader"]


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, collate_fn: Callable[[list], Any] | None = None
) -> DataLoader:
    """A loader over ``dataset``; worker processes are kept between epochs (started once per fit, not per epoch), and
    batches are collated into pinned memory where a CUDA device will take them (faster, asynchronous copies)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
