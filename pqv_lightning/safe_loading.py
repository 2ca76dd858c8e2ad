"""Weights-only loading for every checkpoint a Lightning fit resumes from: local files and URLs alike.

Lightning loads ``Trainer.fit(ckpt_path=...)`` through the strategy's ``CheckpointIO`` with ``weights_only=None``,
which torch reads as ``True`` for local files, but which Lightning turns into ``False`` for ``http(s)://`` paths
(``lightning.fabric.utilities.cloud_io._load``): a URL handed to ``--ckpt_path`` would be unpickled, and a
malicious file would run code. :func:`load_weights_only` wraps the trainer's ``CheckpointIO`` so that every load
is ``weights_only=True`` whatever the path or the caller's ``weights_only`` argument; ``ViTClassifier`` and every
pqv-lightning callback install it in ``setup``, before Lightning restores anything. A file that is not plain
tensors and data is refused with what it holds and what to do, and nothing in it runs.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO

from pqv_lightning.checkpoint import CheckpointError, read_checkpoint

__all__ = ["WeightsOnlyCheckpointIO", "load_weights_only"]


class WeightsOnlyCheckpointIO(CheckpointIO):
    """A ``CheckpointIO`` that saves and removes through ``inner`` and loads only with ``weights_only=True``."""

    def __init__(self, inner: CheckpointIO) -> None:
        super().__init__()
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """``weights_only`` is always True here (``False`` would run what the file holds): a checkpoint that
        needs more is refused, naming it."""
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if text is not None and "://" not in text:
            return read_checkpoint(text, "a Lightning checkpoint of tensors and plain data", mmap=False)
        try:
            kwargs = {} if map_location is None else {"map_location": map_location}
            return self.inner.load_checkpoint(path, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            detail = next((line for line in str(err).splitlines() if "GLOBAL" in line), "")
            raise CheckpointError(
                f"{text or path!r} was refused: it holds objects that only unpickling could rebuild, and checkpoints "
                f"are loaded with weights_only=True (nothing in the file ran). {detail.strip()[:200]} Accepted: a "
                "checkpoint of tensors and plain data, as pqv-lightning and Lightning write them."
            ) from None

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def load_weights_only(trainer: pl.Trainer) -> None:
    """Make every checkpoint load of ``trainer`` weights-only (idempotent; call it in ``setup``)."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, WeightsOnlyCheckpointIO):
        strategy.checkpoint_io = WeightsOnlyCheckpointIO(strategy.checkpoint_io)
