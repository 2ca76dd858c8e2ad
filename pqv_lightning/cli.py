"""The command line: ``LightningCLI`` over ``ViTClassifier`` and any LightningDataModule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from pqv_lightning.module import ViTClassifier

__all__ = ["PQVLightningCLI", "main"]


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


def main(args: list[str] | None = None, run: bool = True) -> PQVLightningCLI:
    """Entry point of ``train.py`` and the ``pqv`` console script."""
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


if __name__ == "__main__":
    main()
