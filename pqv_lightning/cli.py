"""The command line: ``LightningCLI`` over ``ViTClassifier`` and any LightningDataModule.

The pqv-lightning callbacks and data modules are imported here so that ``--help`` lists them and their short
names work (``--trainer.callbacks.help StructuredPruning``, ``--trainer.callbacks+=StructuredPruning``).

A mistake the user can fix (a bad argument, an unusable checkpoint, a fit-end stage that produced nothing) is
reported by pqv-lightning's own message in a few lines, not inside jsonargparse's or Lightning's traceback:
``pqv: error: ratio=1.5 is invalid; accepted: a float in [0, 1).`` and exit status 2 (bad input) or 1 (a run
that fell short). ``PQV_TRACEBACK=1`` shows the full traceback instead.

``--config`` takes a YAML file or the name of a recipe shipped with the package (``pqv fit --config quickstart``,
see :mod:`pqv_lightning.recipes`); ``pqv recipes list | show | copy`` lists the recipes and copies one out to edit.
``recipes`` is answered before LightningCLI parses anything: Lightning's subcommands are the Trainer's methods
(``fit``, ``validate``, ``test``, ``predict``), so one more word beside them keeps one command to learn.
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
from pqv_lightning import recipes
from pqv_lightning.callbacks.fit_end import FitEndIncompleteError
from pqv_lightning.module import ViTClassifier

__all__ = ["PQVLightningCLI", "console_main", "main", "own_error", "resolve_config_args"]

#: The folders of pqv-lightning's own code: an exception raised there is a message meant for the user.
_OWN_CODE = tuple(
    str(Path(package.__file__).resolve().parent)
    for package in (pqv_lightning, pqv_lightning.callbacks, pqv_lightning.datamodules)
)
_USER_ERRORS = (ValueError, TypeError, OSError, AttributeError, RuntimeError)
_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, AttributeError)
_CONFIG_FLAGS = ("-c", "--config")
_CONFIG_HELP = (
    "A YAML configuration file, or the name of a recipe shipped with pqv-lightning (pqv recipes list), "
    "e.g. --config quickstart."
)
_EPILOG = "Recipes shipped with the package: pqv recipes list | show NAME | copy NAME [DEST]."


class PQVLightningCLI(LightningCLI):
    """``fit`` / ``validate`` / ``test`` / ``predict`` with TensorBoard logging and a seed by default."""

    def init_parser(self, **kwargs: Any) -> Any:
        parser = super().init_parser(**kwargs)
        parser._option_string_actions["--config"].help = _CONFIG_HELP  # argparse's own table of options
        return parser

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


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` / ``-c`` value that is not a file but a recipe's name (``quickstart``,
    ``quickstart.yaml``, ``configs/quickstart.yaml``) replaced by the recipe's path; inline YAML passes as is.
    An unknown name raises the one argument error, listing the recipes."""
    out = list(args)
    for i, arg in enumerate(out):
        flag, equals, value = arg.partition("=")
        if equals and flag in _CONFIG_FLAGS:
            out[i] = f"{flag}={_config_path(value)}"
        elif arg in _CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = _config_path(out[i + 1])
    return out


def _config_path(value: str) -> str:
    if Path(value).is_file() or any(mark in value for mark in ":{}[]\n"):  # a file, or YAML written inline
        return value
    path = recipes.find_recipe(value, "config")
    if path != Path(value) and _first_process():
        packaged = path.parent == recipes.recipes_folder()
        hint = f" (packaged; to edit a copy: pqv recipes copy {path.stem})" if packaged else ""
        print(f"pqv: --config {value}: {path}{hint}", file=sys.stderr)
    return str(path)


def _first_process() -> bool:
    """Whether this is the launching process (not a DDP rank that Lightning or the scheduler started)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def main(args: list[str] | None = None, run: bool = True) -> PQVLightningCLI:
    """Entry point of ``train.py`` and the ``pqv`` console script; ``pqv recipes ...`` lists and copies recipes."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["recipes"]:
        raise SystemExit(recipes.main(argv[1:]))
    try:
        resolved = resolve_config_args(argv)
        if args is None:  # in place: Lightning's DDP launcher starts every other rank with sys.argv
            sys.argv[1:] = resolved
        return PQVLightningCLI(
            ViTClassifier,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": _EPILOG},
            args=None if args is None else resolved,
            run=run,
        )
    except Exception as err:
        ours = own_error(err)
        if ours is None or os.environ.get("PQV_TRACEBACK"):
            raise
        status = 2 if isinstance(ours, _BAD_INPUT) and not isinstance(ours, FitEndIncompleteError) else 1
        print(f"pqv: error{_rank_tag()}: {ours}\n(set PQV_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(status) from None


def console_main() -> None:
    """The ``pqv`` console script: :func:`main`, then exit status 0. (The generated script passes the returned value
    to ``sys.exit``, which printed the CLI object and exited 1 after every successful run.)"""
    main()


def _rank_tag() -> str:
    """`` [rank 1/2]`` under a multi-process run, so each process's line says whose it is; empty otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return ""
    return f" [rank {dist.get_rank()}/{dist.get_world_size()}]"


if __name__ == "__main__":
    main()
