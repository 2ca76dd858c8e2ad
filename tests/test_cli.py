"""The command line as a user runs it: help, printed config, a short fit, bad input, and 2-process DDP."""

import pytest
import torch


def test_help_documents_every_option(cli, tmp_path):
    result = cli(["fit", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for option in (
        "--config",
        "--print_config",
        "--trainer.max_epochs",
        "--model",
        "--data",
        "--seed_everything",
    ):
        assert option in result.stdout, option
    model_help = cli(["fit", "--model.help", "pqv_lightning.ViTClassifier"], tmp_path)
    assert model_help.returncode == 0, model_help.stderr
    for option in ("model_name", "model_kwargs", "checkpoint_path", "label_smoothing", "warmup_epochs"):
        assert f"--model.{option}" in model_help.stdout or f".{option}" in model_help.stdout, option


def test_print_config_of_the_quickstart(cli, tmp_path):
    from pathlib import Path

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    result = cli(["fit", "--config", str(quickstart), "--trainer.max_epochs=3", "--print_config"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vit_tiny_patch16_224" in result.stdout and "max_epochs: 3" in result.stdout


@pytest.mark.slow
def test_short_fit_writes_checkpoint_and_tensorboard_events(cli, cli_config, tmp_path):
    callbacks = "\n                - class_path: lightning.pytorch.callbacks.ModelCheckpoint"
    result = cli(["fit", "--config", str(cli_config(tmp_path, callbacks))], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "test" / "version_0"
    assert list(run.glob("checkpoints/*.ckpt")), list(run.rglob("*"))
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()


def test_unknown_model_name_fails_fast_with_suggestions(cli, cli_config, tmp_path):
    config = cli_config(tmp_path)
    result = cli(["fit", "--config", str(config), "--model.init_args.model_name=deit_smal_patch16_224"], tmp_path)
    assert result.returncode != 0
    assert "Unknown timm model name 'deit_smal_patch16_224'" in result.stderr
    assert "deit_small_patch16_224" in result.stderr


DUMP_WEIGHTS = '''
import os
import lightning.pytorch as pl
import torch


class DumpWeights(pl.Callback):
    """Saves every rank's final weights, to compare ranks after a DDP fit."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {name: tensor.detach().cpu() for name, tensor in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
'''


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(cli, cli_config, tmp_path):
    (tmp_path / "dump_weights.py").write_text(DUMP_WEIGHTS)
    callbacks = (
        f"\n                - class_path: dump_weights.DumpWeights"
        f"\n                  init_args: {{out_dir: {tmp_path}}}"
    )
    config = cli_config(tmp_path, callbacks, devices=2, strategy="ddp")
    result = cli(["fit", "--config", str(config)], tmp_path, extra_env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_optimizer_and_scheduler_are_configurable_from_the_command_line(tmp_path, monkeypatch, cli_config):
    from pqv_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "--config",
            str(cli_config(tmp_path)),
            "--model.init_args.optimizer=torch.optim.SGD",
            "--model.init_args.optimizer.lr=0.05",
            "--model.init_args.optimizer.momentum=0.9",
            "--model.init_args.lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--model.init_args.lr_scheduler.step_size=3",
        ],
        run=False,
    )
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.05
    assert optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 3
