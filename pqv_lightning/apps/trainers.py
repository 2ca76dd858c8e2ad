"""The quiet CPU trainer the apps and benchmarks fit with: no progress bar, no checkpoints, no model summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

__all__ = ["quiet_trainer"]


def quiet_trainer(
    max_epochs: int, callbacks: Sequence[pl.Callback] = (), logger: Any = False, **overrides: Any
) -> pl.Trainer:
    """A one-process CPU ``Trainer`` that prints nothing but warnings and writes nothing but ``logger``'s files.

    ``overrides`` go to ``pl.Trainer`` as they are (e.g. ``num_sanity_val_steps=0``, ``default_root_dir``).
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": logger,
        "callbacks": list(callbacks),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **overrides,
    }
    return pl.Trainer(**settings)
