"""The private Lightning API pqv-lightning relies on, in one place (tested in tests/test_lightning_internals.py).

Lightning has no public way to (a) re-wrap a model in DDP after its parameters changed shape mid-fit, or (b) read
the fit's data loaders in ``setup``, before the trainer builds its own. Both are done here and nowhere else, so a
Lightning release that changes them breaks one test that names what changed, not the callbacks in the middle of
a user's fit.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

__all__ = ["fit_data_source", "missing_internals", "rewrap_ddp"]


def missing_internals(trainer: pl.Trainer) -> list[str]:
    """The private Lightning names this module uses that ``trainer``'s Lightning lacks (empty when all is well)."""
    wanted = {
        "DDPStrategy._setup_model": callable(getattr(DDPStrategy, "_setup_model", None)),
        "DDPStrategy._register_ddp_hooks": callable(getattr(DDPStrategy, "_register_ddp_hooks", None)),
    }
    for split in ("train", "val"):
        source = getattr(_loop(trainer, split), "_data_source", None)
        for method in ("is_defined", "dataloader"):
            wanted[f"{split} loop._data_source.{method}"] = callable(getattr(source, method, None))
    return [name for name, present in wanted.items() if not present]


def _loop(trainer: pl.Trainer, split: str) -> object:
    return trainer.fit_loop if split == "train" else trainer.fit_loop.epoch_loop.val_loop


def rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Wrap ``pl_module`` in a new ``DistributedDataParallel`` (its parameters were replaced); False off DDP.

    DDP keeps the parameter list it was built with, so after a shape change it would all-reduce the old tensors.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return False
    strategy.model = strategy._setup_model(pl_module)
    strategy._register_ddp_hooks()
    return True


def fit_data_source(trainer: pl.Trainer, split: str) -> Iterable | None:
    """The loader(s) ``Trainer.fit`` was given for ``split`` (``"train"`` or ``"val"``), usable from ``setup`` on;
    ``None`` when the fit has none."""
    source = _loop(trainer, split)._data_source
    return source.dataloader() if source.is_defined() else None
