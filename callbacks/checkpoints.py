"""``LastCheckpoint``: ``last.ckpt`` written at the end of every epoch, whatever a monitored metric does.

Since Lightning 2.6.0 (Lightning-AI/pytorch-lightning#21244, fixing #20245), ``ModelCheckpoint(save_last=True)``
writes ``last.ckpt`` only when it saves a top-k checkpoint at the same step. With ``monitor="val/top1"`` and
``save_top_k=1`` that is only when the metric improves, so ``last.ckpt`` is the best epoch, not the last one: a fit
killed and resumed from it repeats epochs, and a resumed fit whose later epochs do not improve ends with a
``last.ckpt`` of an earlier epoch (what a user expects to resume from, or to ship, silently is not there). Keep
the monitored ``ModelCheckpoint`` for the best weights (without ``save_last``) and add this callback.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["LastCheckpoint", "warn_if_last_checkpoint_lags"]


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/<filename>.ckpt`` of every ``every_n_epochs`` epochs, overwritten in place (one file).

    Args:
        dirpath: folder of the file; default ``<trainer.log_dir>/checkpoints`` (next to ``ModelCheckpoint``'s).
        filename: file name without ``.ckpt``.
        every_n_epochs: epochs between saves.
        save_weights_only: save only the weights (a smaller file that cannot resume a fit).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str = "last",
        every_n_epochs: int = 1,
        save_weights_only: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_epochs=every_n_epochs,
            save_weights_only=save_weights_only,
            enable_version_counter=False,
        )


def warn_if_last_checkpoint_lags(trainer: pl.Trainer) -> None:
    """Warn once per fit when a monitored ``ModelCheckpoint(save_last=True)`` will not write the last epoch."""
    lagging = [
        cb
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.save_last is True and cb.save_top_k != -1
    ]
    if lagging and not any(isinstance(cb, LastCheckpoint) for cb in trainer.callbacks):
        rank_zero_warn(
            f"ModelCheckpoint(monitor={lagging[0].monitor!r}, save_last=True) writes last.ckpt only when it saves a "
            "top-k checkpoint (Lightning >= 2.6, Lightning-AI/pytorch-lightning#21244): it will hold the best epoch, "
            "not the last. Add pqv_lightning.callbacks.LastCheckpoint() for a checkpoint of every epoch."
        )
