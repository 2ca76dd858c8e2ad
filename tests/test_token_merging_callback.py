"""``TokenMerging`` in a Lightning fit: when it applies, refusals before training, checkpoints, resume, stacking."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks import KnowledgeDistillation, StructuredPruning, TokenMerging
from pqv_lightning.checkpoint import STRUCTURE_KEY, TOKENS_KEY, load_classifier_checkpoint, read_checkpoint
from pqv_lightning.tokens import TokenReduction, is_token_reduced, token_reduction_of
from pqv_lightning.utils.checks import InvalidArgumentError


def trainer_for(tmp_path: Path, callbacks: list, epochs: int = 2, **kwargs) -> pl.Trainer:
    settings = {
        "default_root_dir": tmp_path,
        "max_epochs": epochs,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **settings)


class Watch(Callback):
    """Records, at every training batch, which reduction the module's timm model runs with."""

    def __init__(self) -> None:
        self.seen: dict[int, TokenReduction | None] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, token_reduction_of(pl_module.model))


def every_epoch(tmp_path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=tmp_path / "ckpt", filename="e{epoch}", save_top_k=-1, save_last=True, auto_insert_metric_name=False
    )


# --------------------------------------------------------------------------- arguments and refusals
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": -2}, "r=-2 is invalid"),
        ({"method": "drop"}, "method='drop' is invalid; accepted: merge, prune"),
        ({"schedule": "cosine"}, "schedule='cosine' is invalid"),
        ({"at_epoch": -1}, "at_epoch=-1 is invalid; accepted: an epoch"),
        ({"at_epoch": 1.5}, "at_epoch=1.5 is invalid"),
        ({"proportional_attention": 1}, "proportional_attention=1 is invalid"),
        ({"model_attribute": "not valid"}, "model_attribute='not valid' is invalid"),
    ],
)
def test_arguments_are_checked_at_construction(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        TokenMerging(**kwargs)


class Counting(pl.LightningModule):
    """A user's module around any timm model; counts training steps."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1), "embed_dim": 16, "num_heads": (1, 1), "img_size": 16,
                                          "patch_size": 2, "window_size": 4, "in_chans": 1}, "windowed attention"),
        ("beit_base_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 16, "patch_size": 4,
                                   "in_chans": 1}, "relative position bias"),
    ],
)  # fmt: skip
def test_unsupported_model_is_refused_in_setup(tmp_path, digits, name, kwargs, reason):
    module = Counting(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    trainer = trainer_for(tmp_path, [TokenMerging(r=4)])
    with pytest.raises(InvalidArgumentError, match=reason):
        trainer.fit(module, datamodule=digits)
    assert module.steps == 0


def test_prune_without_class_token_and_late_epoch_are_refused_before_training(tmp_path, digits):
    module = ViTClassifier(
        "vit_tiny_patch16_224",
        10,
        model_kwargs={"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 1, "embed_dim": 32,
                      "num_heads": 2, "class_token": False, "global_pool": "avg"},
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="method='prune' is invalid; accepted: 'merge'"):
        trainer_for(tmp_path, [TokenMerging(method="prune")]).fit(module, datamodule=digits)
    with pytest.raises(InvalidArgumentError, match=r"at_epoch=2 is invalid; accepted: an int in \[0, 1\]"):
        trainer_for(tmp_path, [TokenMerging(at_epoch=2)]).fit(module, datamodule=digits)
    assert module.trainer.global_step == 0


# --------------------------------------------------------------------------- when it applies, checkpoints
def test_trains_with_merging_from_at_epoch_and_checkpoints_rebuild_it(tmp_path, tiny_classifier, digits):
    watch = Watch()
    merging = TokenMerging(r=4, at_epoch=1)
    trainer = trainer_for(tmp_path, [watch, merging, every_epoch(tmp_path)], enable_checkpointing=True)
    trainer.fit(tiny_classifier, datamodule=digits)
    spec = TokenReduction("merge", r=4)
    assert watch.seen == {0: None, 1: spec}
    assert merging.summary["tokens_per_block"] == [17, 13, 9] and merging.summary["applied_at"] == 1
    first, last = read_checkpoint(tmp_path / "ckpt" / "e0.ckpt"), read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert TOKENS_KEY not in first  # epoch 0 trained (and saved) the model without merging
    assert last[TOKENS_KEY] == spec.as_dict()
    assert last["callbacks"][next(k for k in last["callbacks"] if "TokenMerging" in k)]["at_epoch"] == 1

    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = tiny_classifier.eval()(images)
        restored = ViTClassifier.from_checkpoint(tmp_path / "ckpt" / "last.ckpt").eval()
        assert token_reduction_of(restored.model) == spec
        torch.testing.assert_close(restored(images), expected)
        loaded = load_classifier_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # what pqv-export reads
        assert loaded.token_reduction == spec.as_dict() and token_reduction_of(loaded.model) == spec
        torch.testing.assert_close(loaded.model(images), expected)
        dense = ViTClassifier.from_checkpoint(tmp_path / "ckpt" / "e0.ckpt")
        assert not is_token_reduced(dense.model)


def test_resume_follows_the_callback(tmp_path, tiny_classifier, digits):
    trainer_for(tmp_path, [TokenMerging(r=4, at_epoch=1), every_epoch(tmp_path)], enable_checkpointing=True).fit(
        tiny_classifier, datamodule=digits
    )
    # resumed from epoch 0 (dense) with merging from epoch 1: epoch 1 merges
    watch = Watch()
    resumed = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=dict(tiny_classifier.hparams.model_kwargs))
    trainer = trainer_for(tmp_path / "a", [watch, TokenMerging(r=4, at_epoch=1)], epochs=2)
    trainer.fit(resumed, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "e0.ckpt")
    assert watch.seen == {1: TokenReduction("merge", r=4)}
    # resumed from the merging epoch-1 checkpoint, by a callback that merges again from epoch 3: not before
    watch = Watch()
    resumed = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=dict(tiny_classifier.hparams.model_kwargs))
    merging = TokenMerging(r=2, at_epoch=3)
    trainer = trainer_for(tmp_path / "b", [watch, merging], epochs=4)
    with pytest.warns(UserWarning, match="it trains without the reduction until then"):
        trainer.fit(resumed, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "e1.ckpt")
    assert watch.seen == {2: None, 3: TokenReduction("merge", r=2)}
    assert merging.summary["applied_at"] == 3


def test_off_the_shelf_merges_at_train_end_before_the_fit_end_chain(tmp_path, tiny_classifier, digits):
    from pqv_lightning.callbacks import Quantization

    watch = Watch()
    quantization = Quantization(["int8_dynamic:x86"], calibration_batches=1, eval_batches=1)
    merging = TokenMerging(r=4, at_epoch=None)
    trainer = trainer_for(tmp_path, [quantization, watch, merging], epochs=1)
    trainer.fit(tiny_classifier, datamodule=digits)
    spec = TokenReduction("merge", r=4)
    assert watch.seen == {0: None}
    assert token_reduction_of(tiny_classifier.model) == spec
    assert merging.summary["applied_at"] == "train_end"
    (variant,) = quantization.quantized_models
    # the chain's copy keeps the merging (the variant may wrap the model, e.g. in its quantized engine's scope)
    assert [token_reduction_of(m) for m in variant.module.modules() if is_token_reduced(m)] == [spec]


# --------------------------------------------------------------------------- stacking
class UserModule(pl.LightningModule):
    """A user's own module: a timm model at ``self.model`` and plain cross-entropy, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        kwargs = {"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 64, "num_heads": 4}
        self.model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, **kwargs)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("merging_first", [True, False], ids=["merging-first", "pruning-first"])
def test_user_module_gets_merging_and_pruning_in_one_fit(tmp_path, digits, merging_first):
    module = UserModule()
    merging = TokenMerging(r=3, at_epoch=0)
    pruning = StructuredPruning(ratio=0.25, importance="taylor", calibration_batches=1, at_epoch=1)
    callbacks = [merging, pruning] if merging_first else [pruning, merging]
    trainer = trainer_for(tmp_path, [*callbacks, every_epoch(tmp_path)], enable_checkpointing=True)
    trainer.fit(module, datamodule=digits)
    model = module.model
    assert token_reduction_of(model) == TokenReduction("merge", r=3)
    assert model.blocks[0].mlp.fc1.out_features == 192  # 256 -> 75%
    assert pruning.summary["params_after"] < pruning.summary["params_before"]
    with torch.no_grad():
        assert model.eval()(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    last = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last[TOKENS_KEY] == merging.spec.as_dict() and last[STRUCTURE_KEY] is not None
    # a fresh user module resumes the pruned, merging network from the checkpoint
    fresh, watch = UserModule(), Watch()
    callbacks = [TokenMerging(r=3, at_epoch=0), StructuredPruning(ratio=0.25, at_epoch=1), watch]
    trainer = trainer_for(tmp_path / "resume", callbacks, epochs=3)
    trainer.fit(fresh, datamodule=digits, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert watch.seen == {2: TokenReduction("merge", r=3)}
    assert fresh.model.blocks[0].mlp.fc1.out_features == 192


@pytest.mark.parametrize("method", ["merge", "prune"])
def test_stacks_with_distillation_and_bf16_mixed(tmp_path, tiny_classifier, digits, method):
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    merging = TokenMerging(r=4, method=method, at_epoch=0)
    callbacks = [StructuredPruning(ratio=0.25, at_epoch=1), KnowledgeDistillation(), merging, Losses()]
    trainer = trainer_for(tmp_path, callbacks, precision="bf16-mixed")
    trainer.fit(tiny_classifier, datamodule=digits)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert token_reduction_of(tiny_classifier.model) == TokenReduction(method, r=4)
    assert merging.summary["tokens_per_block"] == [17, 13, 9]


def test_state_dict_round_trip():
    merging = TokenMerging(r=5, schedule=[5, 1], at_epoch=None)
    state = merging.state_dict()
    assert state == {
        "spec": {"method": "merge", "r": 5, "schedule": [5, 1], "proportional_attention": True},
        "at_epoch": None,
        "summary": {},
    }
    merging.summary = None
    merging.load_state_dict({**state, "summary": {"tokens_per_block": [17, 12, 11], "applied_at": "train_end"}})
    assert merging.summary["tokens_per_block"] == [17, 12, 11]


def test_recipe_prints_its_config(cli, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tome_digits.yaml"
    result = cli(["fit", "--config", str(recipe), "--print_config"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pqv_lightning.callbacks.TokenMerging" in result.stdout and "img_size: 32" in result.stdout


@pytest.mark.slow
def test_short_name_in_a_cli_fit(cli, cli_config, tmp_path):
    callbacks = "\n                - class_path: TokenMerging\n                  init_args: {r: 4, at_epoch: 1}"
    result = cli(["fit", "--config", str(cli_config(tmp_path, callbacks))], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens per block 17 -> 13" in result.stderr + result.stdout
