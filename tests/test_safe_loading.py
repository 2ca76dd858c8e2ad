"""Nothing a user hands over is unpickled: a resumed checkpoint is loaded weights-only whether it is a local file
or a URL, through the CLI or ``trainer.fit(ckpt_path=...)``, and a bad file is refused with what it is."""

from __future__ import annotations

import functools
import http.server
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning.checkpoint import CheckpointError
from pqv_lightning.datamodules import DigitsDataModule


class Payload:
    """Unpickling this creates ``marker`` (what a real attack would do instead is up to the attacker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "payload": Payload(marker)}, path)
    return path


@contextmanager
def _serving(folder: Path):
    """An HTTP server for ``folder`` on 127.0.0.1 (a free port), stopped when the block ends."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _trainer(root: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip


def test_the_payload_runs_when_unpickled(tmp_path):
    """The fixture is real: loading it without weights_only creates the marker."""
    marker = tmp_path / "pwned"
    torch.load(_malicious_checkpoint(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["url", "file"])
def test_resume_refuses_a_payload_through_trainer_fit(tmp_path, monkeypatch, tiny_classifier, where):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub caches URL downloads there
    served, marker = tmp_path / "served", tmp_path / "pwned"
    served.mkdir()
    _malicious_checkpoint(served / "x.ckpt", marker)
    data = DigitsDataModule(img_size=16, in_chans=1, batch_size=16)
    with _serving(served) as base:
        ckpt = f"{base}/x.ckpt" if where == "url" else served / "x.ckpt"
        with pytest.raises(CheckpointError, match=r"refused|cannot be read as a weights-only torch file"):
            _trainer(tmp_path).fit(tiny_classifier, datamodule=data, ckpt_path=ckpt, weights_only=False)
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_payload_served_to_the_cli(tmp_path, cli, cli_config):
    served, marker = tmp_path / "served", tmp_path / "pwned"
    served.mkdir()
    _malicious_checkpoint(served / "x.ckpt", marker)
    with _serving(served) as base:
        result = cli(
            ["fit", "--config", str(cli_config(tmp_path)), "--ckpt_path", f"{base}/x.ckpt"],
            tmp_path,
            extra_env={"TORCH_HOME": str(tmp_path / "torch_home")},
        )
    assert result.returncode != 0
    assert not marker.exists(), "the served pickle was executed"
    assert "refused" in result.stderr and "weights_only=True" in result.stderr


def test_an_empty_or_truncated_checkpoint_is_named_with_what_is_wrong(tmp_path, tiny_classifier):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    data = DigitsDataModule(img_size=16, in_chans=1, batch_size=16)
    with pytest.raises(CheckpointError, match=r"empty\.ckpt' is empty \(0 bytes\)"):
        _trainer(tmp_path).fit(tiny_classifier, datamodule=data, ckpt_path=empty)
    good = tmp_path / "good.ckpt"
    trainer = _trainer(tmp_path)
    trainer.fit(ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=tiny_classifier.hparams.model_kwargs), data)
    trainer.save_checkpoint(good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt.* is not a Lightning checkpoint.*truncated"):
        _trainer(tmp_path).fit(tiny_classifier, datamodule=data, ckpt_path=truncated)
