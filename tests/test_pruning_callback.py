"""StructuredPruning inside real Lightning fits: optimizers, schedules, checkpoints, resume, DDP, attention."""

from __future__ import annotations

import copy
import textwrap

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks import StructuredPruning
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure
from pqv_lightning.module import warmup_cosine
from pqv_lightning.pruning import PruningSpec, prune

torch.set_num_threads(1)

TRAIN_BATCHES = 3


def make_trainer(tmp_path, max_epochs: int = 1, callbacks=(), **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "limit_train_batches": TRAIN_BATCHES,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(callbacks=list(callbacks), **options)


def classifier(tiny_vit_kwargs, **kwargs) -> ViTClassifier:
    return ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs, **kwargs)


def assert_optimizers_hold_only_model_params(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    model_params = {id(p) for p in module.parameters()}
    held = [p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]]
    assert held, "no optimizer parameters"
    stale = [tuple(p.shape) for p in held if id(p) not in model_params]
    assert not stale, f"optimizer holds parameters that are not the model's: {stale}"
    assert len({id(p) for p in held}) == len(held) == sum(p.requires_grad for p in module.parameters())
    for config in trainer.lr_scheduler_configs:
        assert any(config.scheduler.optimizer is optimizer for optimizer in trainer.optimizers)


class Probe(pl.Callback):
    """Records, before every training step, the shapes the optimizer sees, its LR, and the stale-param check."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert_optimizers_hold_only_model_params(trainer, pl_module)
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "qkv": tuple(pl_module.model.blocks[0].attn.qkv.weight.shape),
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "pruned": current_structure(pl_module.model) is not None,
            }
        )


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- when it prunes
def test_prunes_in_setup_before_optimizers_exist(tmp_path, tiny_vit_kwargs, digits):
    module = classifier(tiny_vit_kwargs)
    dense = copy.deepcopy(module.model)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    pruning, probe = StructuredPruning(ratio=0.25, importance="l2"), Probe()
    trainer = make_trainer(tmp_path, callbacks=[pruning, probe])
    trainer.fit(module, datamodule=digits)

    assert len(probe.steps) == TRAIN_BATCHES and all(s["pruned"] for s in probe.steps)
    assert probe.steps[0]["qkv"] == (3 * 48, 48)  # 64-wide embedding, ratio 0.25
    assert_optimizers_hold_only_model_params(trainer, module)
    assert trainer.global_step == TRAIN_BATCHES

    reference = prune(dense, PruningSpec(ratio=0.25, importance="l2"), torch.randn(1, 1, 16, 16))
    assert param_count(module.model) == param_count(dense) == reference.params_after == pruning.result.params_after
    assert pruning.result.params_after < pruning.result.params_before
    assert pruning.structure["shapes_after"] == reference.structure["shapes_after"]
    # Training moved the pruned weights (the pruned model is the one being trained).
    pruned_qkv = dense.blocks[0].attn.qkv.weight
    assert not torch.equal(module.model.blocks[0].attn.qkv.weight, pruned_qkv)
    assert module.model.blocks[0].attn.qkv.weight.shape == pruned_qkv.shape
    assert before["blocks.0.attn.qkv.weight"].shape[0] == 3 * 64


def test_prunes_after_dense_epochs_and_rebuilds_optimizer_and_schedule(tmp_path, tiny_vit_kwargs, digits):
    module = classifier(tiny_vit_kwargs, warmup_epochs=1.0, lr=1e-3, min_lr=1e-5)
    pruning, probe = StructuredPruning(ratio=0.25, importance="taylor", calibration_batches=2, at_epoch=1), Probe()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[pruning, probe])
    trainer.fit(module, datamodule=digits)

    assert [s["epoch"] for s in probe.steps] == [0] * TRAIN_BATCHES + [1] * TRAIN_BATCHES
    assert [s["pruned"] for s in probe.steps] == [False] * TRAIN_BATCHES + [True] * TRAIN_BATCHES
    assert {s["qkv"] for s in probe.steps[:TRAIN_BATCHES]} == {(192, 64)}
    assert {s["qkv"] for s in probe.steps[TRAIN_BATCHES:]} == {(144, 48)}
    assert trainer.global_step == 2 * TRAIN_BATCHES
    # The schedule continues through the rebuild: warm-up over epoch 0, cosine over epoch 1 (no second warm-up).
    total = 2 * TRAIN_BATCHES
    expected = [1e-3 * warmup_cosine(step, TRAIN_BATCHES, total, 1e-2) for step in range(total)]
    assert [s["lr"] for s in probe.steps] == pytest.approx(expected)
    assert probe.steps[TRAIN_BATCHES]["lr"] == pytest.approx(1e-3)
    # The optimizer stepped the pruned parameters after the rebuild.
    state = trainer.optimizers[0].state
    assert all(p in state for p in module.model.parameters() if p.requires_grad)
    assert pruning.result is not None and pruning.result.params_after == param_count(module.model)


def test_at_epoch_not_before_max_epochs_fails_before_training(tmp_path, tiny_vit_kwargs, digits):
    module = classifier(tiny_vit_kwargs)
    probe = Probe()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[StructuredPruning(at_epoch=2), probe])
    with pytest.raises(ValueError, match=r"at_epoch=2 is not before max_epochs=2.*0 <= at_epoch < 2"):
        trainer.fit(module, datamodule=digits)
    assert probe.steps == [] and current_structure(module.model) is None


def test_an_unreachable_budget_fails_before_the_dense_epochs(tmp_path, tiny_vit_kwargs, digits):
    """The smallest reachable size is known at setup (from the data's image shape): no dense epoch is wasted."""
    module = classifier(tiny_vit_kwargs)
    probe = Probe()
    pruning = StructuredPruning(ratio=None, target_macs=1, importance="taylor", calibration_batches=2, at_epoch=1)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[pruning, probe])
    with pytest.raises(ValueError, match=r"target_macs=1 is unreachable: .* leaves \d+ macs; accepted: a budget >="):
        trainer.fit(module, datamodule=digits)
    assert probe.steps == [] and current_structure(module.model) is None


def test_at_epoch_beyond_max_steps_fails_before_the_first_step(tmp_path, tiny_vit_kwargs, digits):
    """Limited by ``max_steps`` only (3 steps an epoch here), epoch 2 ends at the last step: refused before training."""
    module = classifier(tiny_vit_kwargs)
    probe = Probe()
    trainer = make_trainer(tmp_path, callbacks=[StructuredPruning(at_epoch=2), probe], max_epochs=None, max_steps=6)
    message = (
        r"at_epoch=2 needs 6 training steps \(3 an epoch\).*max_steps=6.*Accepted: 0 <= at_epoch <= 1, or max_steps > 6"
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, datamodule=digits)
    assert probe.steps == [] and current_structure(module.model) is None
    # One more step leaves a step of finetuning after pruning: accepted, and it prunes.
    trainer = make_trainer(tmp_path, callbacks=[StructuredPruning(at_epoch=2), probe], max_epochs=None, max_steps=7)
    trainer.fit(module, datamodule=digits)
    assert trainer.global_step == 7 and [s["pruned"] for s in probe.steps] == [False] * 6 + [True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, r"ratio=1.5 is invalid; accepted: a float in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio=-0.1 is invalid"),
        ({"importance": "l3"}, r"importance='l3' is invalid; accepted: l1, l2, taylor, hessian, random"),
        ({"importance": 3}, r"importance=3 is invalid"),
        ({"at_epoch": -1}, r"at_epoch=-1 is invalid"),
        ({"at_epoch": 1.5}, r"at_epoch=1.5 is invalid"),
        ({"calibration_batches": 0}, r"calibration_batches=0 is invalid"),
        ({"ratio": 0.2, "target_macs": 1e6}, r"either ratio \(0.2\) or a budget"),
        ({"model_attribute": ""}, r"model_attribute=''"),
    ],
)
def test_bad_arguments_fail_in_constructor(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


def test_unknown_ignored_layer_fails_before_training(tmp_path, tiny_vit_kwargs, digits):
    module = classifier(tiny_vit_kwargs)
    trainer = make_trainer(tmp_path, callbacks=[StructuredPruning(ignored_layers=["blocks.9.mlp.fc1"])])
    with pytest.raises(ValueError, match=r"ignored_layers \['blocks.9.mlp.fc1'\] are not modules"):
        trainer.fit(module, datamodule=digits)
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------------- foreign modules
class ForeignModule(pl.LightningModule):
    """A user's own module: only the ``self.model`` contract in common with ViTClassifier."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=10,
            img_size=16,
            patch_size=4,
            in_chans=1,
            depth=depth,
            embed_dim=64,
            num_heads=4,
        )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class NoModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(256, 10)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("at_epoch", [0, 1])
def test_foreign_module(tmp_path, digits, at_epoch):
    module, probe = ForeignModule(), Probe()
    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[StructuredPruning(at_epoch=at_epoch), probe], limit_val_batches=0
    )
    trainer.fit(module, datamodule=digits)
    assert [s["pruned"] for s in probe.steps] == [True] * 6 if at_epoch == 0 else [False] * 3 + [True] * 3
    assert module.model.blocks[1].mlp.fc1.out_features == 192
    assert_optimizers_hold_only_model_params(trainer, module)


def test_module_without_model_attribute(tmp_path, digits):
    trainer = make_trainer(tmp_path, callbacks=[StructuredPruning()])
    with pytest.raises(AttributeError, match=r"expose its timm model as the attribute 'model'.*NoModel.model"):
        trainer.fit(NoModel(), datamodule=digits)
    trainer = make_trainer(tmp_path, callbacks=[StructuredPruning(model_attribute="net")])
    with pytest.raises(Exception, match=r"(?i)vision transformer|not supported|unsupported|family"):
        trainer.fit(NoModel(), datamodule=digits)


# ----------------------------------------------------------------------------------------------- checkpoints
def _fit_and_save(tmp_path, module, pruning, max_epochs: int, name: str):
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, callbacks=[pruning])
    trainer.fit(module, datamodule=_digits())
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return trainer, path


def _digits():
    from pqv_lightning.datamodules import DigitsDataModule

    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32)


class WeightsAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.global_step = trainer.global_step
        assert_optimizers_hold_only_model_params(trainer, pl_module)


@pytest.mark.parametrize("at_epoch", [0, 1])
def test_checkpoint_holds_structure_and_resumes(tmp_path, tiny_vit_kwargs, at_epoch):
    module = classifier(tiny_vit_kwargs)
    pruning = StructuredPruning(ratio=0.25, importance="l1", at_epoch=at_epoch)
    _, path = _fit_and_save(tmp_path, module, pruning, max_epochs=at_epoch + 1, name="pruned.ckpt")

    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[STRUCTURE_KEY] == current_structure(module.model)
    assert checkpoint["state_dict"]["model.blocks.0.attn.qkv.weight"].shape == (144, 48)

    loaded = ViTClassifier.from_checkpoint(path)
    images = torch.randn(4, 1, 16, 16)
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module(images), rtol=0, atol=0)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
    loaded_strict = ViTClassifier.load_from_checkpoint(path, weights_only=True)
    assert current_structure(loaded_strict.model) == checkpoint[STRUCTURE_KEY]

    # Resume: a NEW trainer, a NEW dense module (another random init) and a NEW callback.
    torch.manual_seed(123)
    fresh, start = classifier(tiny_vit_kwargs), WeightsAtTrainStart()
    probe = Probe()
    trainer = make_trainer(
        tmp_path,
        max_epochs=at_epoch + 2,
        callbacks=[StructuredPruning(ratio=0.25, importance="l1", at_epoch=at_epoch), start, probe],
    )
    trainer.fit(fresh, datamodule=_digits(), ckpt_path=path)
    assert start.global_step == (at_epoch + 1) * TRAIN_BATCHES
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(start.state[key], value), key
    assert current_structure(fresh.model) == checkpoint[STRUCTURE_KEY]
    assert len(probe.steps) == TRAIN_BATCHES and all(s["qkv"] == (144, 48) for s in probe.steps)
    assert trainer.global_step == (at_epoch + 2) * TRAIN_BATCHES


def test_resumed_schedule_matches_uninterrupted_run_after_mid_fit_pruning(tmp_path, tiny_vit_kwargs):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None):
        torch.manual_seed(0)
        probe = Probe()
        saver = ModelCheckpoint(dirpath=tmp_path / "sched", filename="{epoch}", save_top_k=-1)
        trainer = make_trainer(
            tmp_path,
            max_epochs=3,
            callbacks=[StructuredPruning(at_epoch=1), probe, saver],
            enable_checkpointing=True,
        )
        trainer.fit(classifier(tiny_vit_kwargs, warmup_epochs=1.0), datamodule=_digits(), ckpt_path=ckpt_path)
        return [s["lr"] for s in probe.steps]

    full = run()
    resumed = run(tmp_path / "sched" / "epoch=1.ckpt")
    assert len(full) == 3 * TRAIN_BATCHES and len(resumed) == TRAIN_BATCHES
    assert resumed == pytest.approx(full[-TRAIN_BATCHES:])


def test_resume_from_dense_checkpoint_saved_before_pruning_epoch(tmp_path, tiny_vit_kwargs):
    """A checkpoint written at the end of the last dense epoch, before the pruning hook: resume must still prune."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=False
    )
    trainer = make_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[StructuredPruning(at_epoch=1, importance="l2"), saver],
        enable_checkpointing=True,
    )
    trainer.fit(classifier(tiny_vit_kwargs), datamodule=_digits())
    path = tmp_path / "ckpts" / "epoch=0.ckpt"
    assert STRUCTURE_KEY not in torch.load(path, weights_only=True)  # saved after validation, before pruning
    assert STRUCTURE_KEY in torch.load(tmp_path / "ckpts" / "epoch=1.ckpt", weights_only=True)
    fresh, probe = classifier(tiny_vit_kwargs), Probe()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[StructuredPruning(at_epoch=1, importance="l2"), probe])
    trainer.fit(fresh, datamodule=_digits(), ckpt_path=path)
    assert [s["epoch"] for s in probe.steps] == [1] * TRAIN_BATCHES
    assert all(s["pruned"] and s["qkv"] == (144, 48) for s in probe.steps)
    # Pruned from the checkpoint's trained dense weights: the same structure as pruning them directly.
    dense = classifier(tiny_vit_kwargs)
    dense.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    reference = prune(dense.model, PruningSpec(importance="l2"), torch.randn(1, 1, 16, 16))
    assert current_structure(fresh.model)["ops"] == reference.structure["ops"]


def test_resume_past_at_epoch_from_dense_run_prunes_at_once(tmp_path, tiny_vit_kwargs, digits):
    """The callback added to a dense run resumed after its at_epoch: pruning happens at the next epoch start."""
    _, path = _fit_and_save(tmp_path, classifier(tiny_vit_kwargs), pl.Callback(), 2, "dense2.ckpt")
    fresh, probe = classifier(tiny_vit_kwargs), Probe()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[StructuredPruning(at_epoch=1), probe])
    trainer.fit(fresh, datamodule=digits, ckpt_path=path)
    assert [s["epoch"] for s in probe.steps] == [2] * TRAIN_BATCHES
    assert all(s["pruned"] and s["qkv"] == (144, 48) for s in probe.steps)


def test_foreign_module_resumes(tmp_path, digits):
    module = ForeignModule()
    _, path = _fit_and_save(tmp_path, module, StructuredPruning(importance="l2"), 1, "foreign.ckpt")
    saved = torch.load(path, weights_only=True)
    fresh, start = ForeignModule(), WeightsAtTrainStart()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[StructuredPruning(importance="l2"), start])
    trainer.fit(fresh, datamodule=digits, ckpt_path=path)
    for key, value in saved["state_dict"].items():
        assert torch.equal(start.state[key], value), key
    assert current_structure(fresh.model) == saved[STRUCTURE_KEY]


def test_checkpoint_of_other_architecture_is_refused(tmp_path, digits):
    _, path = _fit_and_save(tmp_path, ForeignModule(depth=2), StructuredPruning(), 1, "depth2.ckpt")
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[StructuredPruning()])
    with pytest.raises(ValueError, match=r"structure does not match the model.*blocks.2"):
        trainer.fit(ForeignModule(depth=3), datamodule=digits, ckpt_path=path)


def test_dense_checkpoint_with_prune_at_start_is_refused(tmp_path, tiny_vit_kwargs, digits):
    module = classifier(tiny_vit_kwargs)
    trainer = make_trainer(tmp_path)
    trainer.fit(module, datamodule=digits)
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[StructuredPruning()])
    with pytest.raises(ValueError, match=r"holds a dense model.*at_epoch=0"):
        trainer.fit(classifier(tiny_vit_kwargs), datamodule=digits, ckpt_path=path)


# --------------------------------------------------------------------------------------------------- attention
def test_fused_and_eager_attention_agree_after_pruning_in_fit(tmp_path, tiny_vit_kwargs, digits):
    module = classifier(tiny_vit_kwargs)
    trainer = make_trainer(tmp_path, callbacks=[StructuredPruning(ratio=0.5, importance="l2")])
    trainer.fit(module, datamodule=digits)
    attns = [m for m in module.model.modules() if isinstance(m, timm.models.vision_transformer.Attention)]
    assert attns and all(a.head_dim == 8 and a.scale == pytest.approx(8**-0.5) for a in attns)
    images = torch.randn(8, 1, 16, 16)
    module.eval()
    outputs = {}
    for fused in (True, False):
        for attn in attns:
            attn.fused_attn = fused
        with torch.no_grad():
            outputs[fused] = module(images)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.parametrize("at_epoch", [0, 1])
def test_ddp_ranks_build_identical_network(tmp_path, cli, ddp_probe, at_epoch):
    config = textwrap.dedent(
        f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 2
          strategy: ddp
          max_epochs: {at_epoch + 1}
          limit_train_batches: 2
          limit_val_batches: 1
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: pqv_lightning.callbacks.StructuredPruning
              init_args:
                ratio: 0.25
                importance: taylor
                calibration_batches: 2
                at_epoch: {at_epoch}
            - class_path: ddp_probe.SaveRankState
              init_args:
                out_dir: {tmp_path}
        model:
          class_path: pqv_lightning.ViTClassifier
          init_args:
            model_name: vit_tiny_patch16_224
            num_classes: 10
            model_kwargs: {{img_size: 16, patch_size: 4, in_chans: 1, depth: 2, embed_dim: 64, num_heads: 4}}
        data:
          class_path: pqv_lightning.datamodules.DigitsDataModule
          init_args: {{img_size: 16, in_chans: 1, batch_size: 16}}
        """
    )
    (tmp_path / "config.yaml").write_text(config)
    done = cli(
        ["fit", "--config", str(tmp_path / "config.yaml")],
        cwd=tmp_path,
        timeout=300,
        extra_env={"PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    assert states[0]["model.blocks.0.attn.qkv.weight"].shape == (144, 48)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert int(states[0]["stale_optimizer_params"]) == 0
    pruned_params = sum(v.numel() for k, v in states[0].items() if k.startswith("model."))
    assert int(states[0]["ddp_wrapped_params"]) == pruned_params
    assert "StructuredPruning: ratio 0.25 (taylor)" in done.stdout + done.stderr
