"""Mistakes a new user makes in the first hour, each refused before any long work with what to change, and shown
on the command line as pqv's own message in a few lines."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning.checkpoint import CheckpointError
from pqv_lightning.datamodules import DigitsDataModule


def test_a_lightning_checkpoint_given_as_checkpoint_path_says_how_to_load_it(tmp_path, tiny_vit_kwargs):
    # A dense ViTClassifier checkpoint starts a new run (tests/test_pretrained_starts.py); one of a pruned run does
    # not fit the dense widths and is refused with the two ways to use it.
    from pqv_lightning.checkpoint import set_structure
    from pqv_lightning.pruning import PruningSpec, prune

    module = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=tiny_vit_kwargs)
    result = prune(module.model, PruningSpec(ratio=0.25), torch.zeros(1, 1, 16, 16))
    set_structure(module.model, result.structure)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"checkpoint_path=.*run\.ckpt' is invalid.*--ckpt_path.*from_checkpoint"):
        ViTClassifier("vit_tiny_patch16_224", 10, checkpoint_path=str(path), model_kwargs=tiny_vit_kwargs)


def test_weights_of_another_width_are_named_layer_by_layer(tmp_path, tiny_vit_kwargs):
    wide = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**tiny_vit_kwargs, "embed_dim": 96})
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"do not fit: cls_token: \[1, 1, 96\] in the file, \[1, 1, 64\] in the model"):
        ViTClassifier(
            "vit_tiny_patch16_224", 10, checkpoint_path=str(tmp_path / "wide.pth"), model_kwargs=tiny_vit_kwargs
        )


def test_a_truncated_weights_file_is_called_truncated(tmp_path, tiny_vit_kwargs):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10, **tiny_vit_kwargs)
    torch.save(source.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated"):
        ViTClassifier(
            "vit_tiny_patch16_224", 10, checkpoint_path=str(tmp_path / "cut.pth"), model_kwargs=tiny_vit_kwargs
        )
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated"):
        ViTClassifier.from_checkpoint(tmp_path / "cut.ckpt")


def test_data_and_model_image_sizes_that_differ_fail_at_setup(tmp_path, tiny_classifier):
    steps = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            steps.append(1)

    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[Count()],
        default_root_dir=tmp_path,
    )  # fmt: skip
    message = r"1-channel 32x32 images but the model takes 1-channel 16x16.*data.init_args.img_size"
    with pytest.raises(ValueError, match=message):
        trainer.fit(tiny_classifier, datamodule=DigitsDataModule(img_size=32, in_chans=1))
    assert steps == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainer.callbacks+=StructuredPruning", "--trainer.callbacks.ratio=1.5"], "ratio=1.5 is invalid"),
        (["--model.init_args.lr=-1"], "lr=-1.0 is invalid; accepted: a finite number > 0"),
        (["--data.init_args.img_size=32"], "1-channel 32x32 images but the model takes 1-channel 16x16"),
    ],
)
def test_the_cli_shows_pqvs_message_first_in_a_few_lines(tmp_path, cli, cli_config, flags, message):
    result = cli(["fit", "--config", str(cli_config(tmp_path)), *flags], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    # Lightning's own start-up lines (seed, devices) may come first; then pqv's message and the traceback hint
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    ours = [i for i, line in enumerate(lines) if line.startswith("pqv: error: ")]
    assert ours and message in lines[ours[0]] and len(lines) - ours[0] == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Union subtypes" not in result.stderr


def test_the_cli_lists_and_explains_the_pqv_callbacks_by_short_name(tmp_path, cli):
    result = cli(["fit", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("StructuredPruning", "SparsityGates", "KnowledgeDistillation", "Quantization", "MobileExport"):
        assert f"pqv_lightning.callbacks.{name}" in result.stdout, name
    result = cli(["fit", "--trainer.callbacks.help", "StructuredPruning"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--trainer.callbacks.at_epoch" in result.stdout
    assert "0 prunes at fit start" in " ".join(result.stdout.split())
