"""Shared fixtures: tiny timm ViTs and small real data, so every test runs offline in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
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
def cli():
    """``cli(args, cwd)`` runs ``python train.py *args`` in a subprocess."""
    return run_cli
