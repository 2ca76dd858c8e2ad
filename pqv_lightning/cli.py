"""The command line: ``LightningCLI`` over ``ViTClassifier`` and any LightningDataModule.

The pqv-lightning callbacks and data modules are imported here so that ``--help`` lists them and their short
names work (``--trainer.callbacks.help StructuredPruning``, ``--trainer.callbacks+=StructuredPruning``).

A mistake the user can fix (a bad argument, an unusable checkpoint, a fit-end stage that produced nothing) is
reported by pqv-lightning's own message in a few lines, not inside jsonargparse's or Lightning's traceback:
``pqv: error: ratio=1.5 is invalid; accepted: a float in [0, 1).`` and exit status 2 (bad input) or 1 (a run
that fell short). ``PQV_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import pqv_lightning.callbacks
import pqv_lightning.datamodules
from pqv_lightning.callbacks.fit_end import FitEndIncompleteError
from pqv_lightning.module import ViTClassifier

__all__ = ["PQVLightningCLI", "main", "own_error"]

#: The folders of pqv-lightning's own code: an exception raised there is a message meant for the user.
_OWN_CODE = tuple(
    str(Path(package.__file__).resolve().parent)
    for package in (pqv_lightning, pqv_lightning.callbacks, pqv_lightning.datamodules)
)
_USER_ERRORS = (ValueError, TypeError, OSError, AttributeError, RuntimeError)
_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, AttributeError)


class PQVLightningCLI(LightningCLI):
    """``fit`` / ``validate`` / ``test`` / ``predict`` with TensorBoard logging and a seed by default."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "pqv"},
                },
            }
        )


def own_error(err: BaseException) -> BaseException | None:
    """The first exception in ``err``'s chain (itself, its causes and contexts) that pqv-lightning's own code
    raised for the user: a bad value, a file that cannot be used, a run that fell short. ``None`` otherwise (a bug
    or a library's own failure keeps its traceback)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        raised_here = bool(frames) and frames[-1].filename.startswith(_OWN_CODE)
        if isinstance(current, _USER_ERRORS) and raised_here:
            return current
        pending += [current.__cause__, current.__context__]
    return None


def main(args: list[str] | None = None, run: bool = True) -> PQVLightningCLI:
    """Entry point of ``train.py`` and the ``pqv`` console script."""
    try:
        return PQVLightningCLI(
            ViTClassifier,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except Exception as err:
        ours = own_error(err)
        if ours is None or os.environ.get("PQV_TRACEBACK"):
            raise
        status = 2 if isinstance(ours, _BAD_INPUT) and not isinstance(ours, FitEndIncompleteError) else 1
        print(f"pqv: error{_rank_tag()}: {ours}\n(set PQV_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(status) from None


def _rank_tag() -> str:
    """`` [rank 1/2]`` under a multi-process run, so each process's line says whose it is; empty otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return ""
    return f" [rank {dist.get_rank()}/{dist.get_world_size()}]"


if __name__ == "__main__":
    main()
