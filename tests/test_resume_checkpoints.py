"""A killed fit resumed from ``last.ckpt`` ends with a ``last.ckpt`` of its last epoch (issue 15, item 4).

The cause was Lightning's: since 2.6.0 (Lightning-AI/pytorch-lightning#21244) ``ModelCheckpoint(save_last=True)``
writes ``last.ckpt`` only when it saves a top-k checkpoint, i.e. when the monitored metric improves. The recipes
keep the monitored checkpoint for the best weights and add ``LastCheckpoint`` for every epoch; this test runs the
quickstart recipe's own checkpoint callbacks.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

KILLER = '''
import os, signal
import lightning.pytorch as pl


class KillAt(pl.Callback):
    """SIGKILL (no clean-up, as a crashed node) at one batch of one epoch."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def _recipe(tmp_path: Path) -> Path:
    quickstart = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    checkpoints = [cb for cb in quickstart["trainer"]["callbacks"] if "Checkpoint" in cb["class_path"]]
    assert [cb["class_path"].rsplit(".", 1)[1] for cb in checkpoints] == ["ModelCheckpoint", "LastCheckpoint"]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 6, "limit_train_batches": 3, "limit_val_batches": 2,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "r"}},
            "callbacks": [*checkpoints, {"class_path": "pqv_lightning.callbacks.StructuredPruning",
                                         "init_args": {"ratio": 0.25, "at_epoch": 2}}],
        },
        "model": {"class_path": "pqv_lightning.ViTClassifier", "init_args": {
            "model_name": "vit_tiny_patch16_224", "num_classes": 10,
            "model_kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 1, "embed_dim": 32,
                             "num_heads": 2, "global_pool": "avg"}}},
        "data": {"class_path": "pqv_lightning.datamodules.DigitsDataModule",
                 "init_args": {"img_size": 16, "in_chans": 1, "batch_size": 16}},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_killed_fit_resumed_from_last_ckpt_checkpoints_its_last_epoch(tmp_path, cli):
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    recipe = _recipe(tmp_path)
    killed = cli(
        ["fit", "--config", str(recipe), "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.epoch=4"],
        tmp_path,
        extra_env={"PYTHONPATH": str(tmp_path)},
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL during epoch 4
    last = tmp_path / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 3  # the epoch before the kill, whatever val/top1 did
    resumed = cli(["fit", "--config", str(recipe), "--ckpt_path", str(last)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = torch.load(tmp_path / "runs" / "r" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (5, 18)
    assert final["pqv_pruned_structure"] is not None
