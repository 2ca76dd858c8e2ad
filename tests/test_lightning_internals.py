"""The private Lightning API the callbacks use, checked in one place: a Lightning release that renames it fails
here, naming what is gone, instead of deep inside a user's fit (see callbacks/_lightning_internals.py)."""

from __future__ import annotations

import lightning
import lightning.pytorch as pl
import pytest

from pqv_lightning.callbacks._lightning_internals import fit_data_source, missing_internals
from pqv_lightning.datamodules import DigitsDataModule


def test_the_private_lightning_api_we_use_exists():
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    missing = missing_internals(trainer)
    assert not missing, (
        f"Lightning {lightning.__version__} lacks {missing}: update pqv_lightning/callbacks/_lightning_internals.py"
    )


class _Stop(Exception):
    pass


def test_fit_data_source_reads_the_loaders_before_the_trainer_builds_its_own(tiny_classifier):
    seen = {}

    class Peek(pl.Callback):
        def setup(self, trainer, pl_module, stage) -> None:
            seen["train"] = fit_data_source(trainer, "train")
            seen["val"] = fit_data_source(trainer, "val")
            raise _Stop  # before any training

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[Peek()])
    data = DigitsDataModule(img_size=16, in_chans=1, batch_size=16)
    with pytest.raises(_Stop):
        trainer.fit(tiny_classifier, datamodule=data)
    assert len(next(iter(seen["train"]))[0]) == 16 and seen["val"] is not None
