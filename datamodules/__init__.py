"""Lightning data modules of pqv-lightning (installed as ``pqv_lightning.datamodules``)."""

from pqv_lightning.datamodules.digits import DigitsDataModule
from pqv_lightning.datamodules.hf import AUGMENTATIONS, HFImageDataModule

__all__ = ["AUGMENTATIONS", "DigitsDataModule", "HFImageDataModule"]
