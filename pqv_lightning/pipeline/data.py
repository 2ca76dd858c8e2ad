"""What every stage of the fit-end chain shares: its data loaders, read per stage, and its folder argument check."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.utils.batches import collect_batches
from pqv_lightning.utils.checks import invalid

__all__ = ["CALIBRATION_SPLITS", "StageData", "check_stage_dir"]

CALIBRATION_SPLITS = ("train", "val")


def check_stage_dir(value: Any) -> Path | None:
    """A stage's ``output_dir``: ``None`` (the default folder) or a folder path."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise invalid("output_dir", value, "None (the default folder) or a folder path")
    return Path(value)


class StageData:
    """The validation and training loaders, read per stage in the order the stages ask (each its own count)."""

    def __init__(self, val: Iterable, train: Iterable | None) -> None:
        self._loaders = {"val": val, "train": train}

    def batches(self, split: str, count: int | None, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = self._loaders[split]
        if loader is None:
            raise RuntimeError(f"No {split} data: {what} needs a {split} data loader.")
        return collect_batches(loader, count, what)
