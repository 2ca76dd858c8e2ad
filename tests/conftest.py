"""Shared fixtures: tiny timm ViTs and small real data, so every test runs offline in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: A 2-block ViT for 16 px grey digits: 16 tokens, 64 wide (about 0.1M parameters).
TINY_VIT_KWARGS = {
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "depth": 2,
    "embed_dim": 64,
    "num_heads": 4,
}
#: The session's shared ``trained_tiny_vit``: average pooling trains faster and quantizes more faithfully here.
TRAINED_TINY_VIT_KWARGS = {**TINY_VIT_KWARGS, "global_pool": "avg"}
TINY_VIT_EPOCHS = 15


@pytest.fixture
def tiny_vit_kwargs() -> dict:
    return dict(TINY_VIT_KWARGS)


@pytest.fixture
def tiny_classifier():
    from pqv_lightning import ViTClassifier

    return ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(TINY_VIT_KWARGS))


@pytest.fixture
def digits():
    from pqv_lightning.datamodules import DigitsDataModule

    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session: tiny models run faster and steadier on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digit_tensors() -> dict:
    """The digits splits of ``DigitsDataModule`` (16 px, 1 channel, normalised, no augmentation) as tensors.

    ``x_train``/``y_train`` is the training split (1,257 images); ``x_heldout``/``y_heldout`` joins the
    validation and test splits (540 images) that no model here is trained on.
    """
    import torch

    from pqv_lightning.datamodules import DigitsDataModule

    data = DigitsDataModule(img_size=16, in_chans=1, augment=False)
    data.setup()
    train, val, test = (data.train_dataloader(), data.val_dataloader(), data.test_dataloader())
    return {
        "x_train": train.dataset.images,
        "y_train": train.dataset.labels,
        "x_heldout": torch.cat([val.dataset.images, test.dataset.images]),
        "y_heldout": torch.cat([val.dataset.labels, test.dataset.labels]),
    }


@pytest.fixture(scope="session")
def trained_tiny_vit(digit_tensors):
    """The one tiny timm ViT (``TRAINED_TINY_VIT_KWARGS``) trained briefly on the digits training split, in eval mode.

    Shared by the whole session: deep-copy it before changing it.
    """
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TRAINED_TINY_VIT_KWARGS)
    x, y = digit_tensors["x_train"], digit_tensors["y_train"]
    epochs, batch = TINY_VIT_EPOCHS, 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * (len(y) // batch))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - batch + 1, batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_classifier(trained_tiny_vit):
    """``trained_classifier(**kwargs)`` builds a ``ViTClassifier`` whose ``.model`` starts from a copy of the
    session's ``trained_tiny_vit``, with fine-tuning settings, so a fit of an epoch or two is accurate."""
    import torch

    from pqv_lightning import ViTClassifier

    def build(**kwargs) -> ViTClassifier:
        settings = {"lr": 1e-3, "warmup_epochs": 0.0, "label_smoothing": 0.0, "weight_decay": 0.01, **kwargs}
        torch.manual_seed(0)
        module = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=dict(TRAINED_TINY_VIT_KWARGS), **settings)
        module.model.load_state_dict(trained_tiny_vit.state_dict())
        return module

    return build


@pytest.fixture(scope="session")
def capture_logger():
    """The class of a Lightning logger that keeps every logged metric and text table in memory."""
    from lightning.pytorch.loggers import Logger

    class CaptureLogger(Logger):
        """Keeps ``metrics`` and ``texts`` (``experiment.add_text`` like TensorBoard's); ``save_dir`` as given."""

        def __init__(self, save_dir: str | None = None) -> None:
            super().__init__()
            self.metrics: dict[str, float] = {}
            self.texts: dict[str, str] = {}
            self._save_dir = save_dir

        @property
        def name(self) -> str:
            return "capture"

        @property
        def version(self) -> int:
            return 0

        @property
        def save_dir(self) -> str | None:
            return self._save_dir

        @property
        def experiment(self) -> CaptureLogger:
            return self

        def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
            self.texts[tag] = text

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.metrics.update(metrics)

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    return CaptureLogger


def run_cli(args: list[str], cwd: Path, timeout: float = 600, extra_env: dict | None = None):
    """Run ``train.py`` in a subprocess (as a user would) and return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def ddp_probe(tmp_path) -> Path:
    """``tests/ddp_probe.py`` copied into ``tmp_path`` (run the CLI with ``PYTHONPATH=tmp_path``), where a recipe
    names ``ddp_probe.SaveRankState`` and a test's own probe module imports its helpers."""
    target = tmp_path / "ddp_probe.py"
    target.write_text((REPO / "tests" / "ddp_probe.py").read_text())
    return target


@pytest.fixture
def cli():
    """``cli(args, cwd)`` runs ``python train.py *args`` in a subprocess."""
    return run_cli


TINY_MODEL = (
    '{"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 1, "embed_dim": 32, "num_heads": 2,'
    ' "global_pool": "avg"}'
)


def write_cli_config(tmp_path, extra_callbacks: str = "", devices: int = 1, strategy: str = "auto"):
    """A tiny-ViT digits recipe for ``train.py fit`` (2 epochs, 3 batches), TensorBoard logs in tmp_path/runs."""
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            seed_everything: 0
            trainer:
              accelerator: cpu
              devices: {devices}
              strategy: {strategy}
              max_epochs: 2
              limit_train_batches: 3
              limit_val_batches: 2
              enable_progress_bar: false
              enable_model_summary: false
              logger:
                class_path: lightning.pytorch.loggers.TensorBoardLogger
                init_args: {{save_dir: {tmp_path / "runs"}, name: test}}
              callbacks:{extra_callbacks or " []"}
            model:
              class_path: pqv_lightning.ViTClassifier
              init_args:
                model_name: vit_tiny_patch16_224
                num_classes: 10
                model_kwargs: {TINY_MODEL}
            data:
              class_path: pqv_lightning.datamodules.DigitsDataModule
              init_args: {{img_size: 16, in_chans: 1, batch_size: 16}}
            """
        )
    )
    return path


@pytest.fixture
def cli_config():
    """``cli_config(tmp_path, extra_callbacks="", devices=1, strategy="auto")`` writes a tiny CLI recipe."""
    return write_cli_config
