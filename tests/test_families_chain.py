"""The mobile and ViT-relative families through the Lightning chain: pruning at epoch K and at fit start, a foreign
LightningModule with resume, sparsity gates, quantization and export at fit end, and DDP.

Tiny configurations, two batches an epoch. DDP runs for one coupling family: on every rank, rank 0's structure is
replayed by ``apply_structure``, which is family-independent (the recorded layer-pruner calls, then the family's
attribute fixes from plain data), and ``tests/test_families.py`` checks that replay bit-identical for every family.
"""

from __future__ import annotations

import json
import textwrap

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks import MobileExport, Quantization, SparsityGates, StructuredPruning
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.pruning import UnsupportedModelError
from pqv_lightning.pruning.gates import has_gates

torch.set_num_threads(1)

#: family -> (timm name, kwargs, image size), for one-channel digits.
CHAIN = {
    "levit": (
        "levit_128s",
        {"img_size": 32, "embed_dim": (16, 24), "key_dim": 8, "num_heads": (2, 3), "depth": (1, 1)},
        32,
    ),
    "efficientformerv2": (
        "efficientformerv2_s0",
        {"depths": (1, 1, 1, 1), "embed_dims": (16, 16, 24, 32), "img_size": 64},
        64,
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "embed_dim": 16, "depths": (1, 1), "num_heads": (2, 2), "window_size": 4},
        32,
    ),
    "efficientvit_msra": (
        "efficientvit_m0",
        {"img_size": 64, "embed_dim": (16, 24, 32), "depth": (1, 1, 1), "num_heads": (2, 2, 2)},
        64,
    ),
    "eva": (
        "eva02_tiny_patch14_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4, "ref_feat_shape": (4, 4)},
        32,
    ),
}


def _classifier(family: str, **kwargs) -> ViTClassifier:
    name, model_kwargs, _ = CHAIN[family]
    torch.manual_seed(0)
    return ViTClassifier(name, num_classes=10, model_kwargs={**model_kwargs, "in_chans": 1}, **kwargs)


def _digits(family: str) -> DigitsDataModule:
    return DigitsDataModule(img_size=CHAIN[family][2], in_chans=1, batch_size=16)


def _trainer(tmp_path, max_epochs: int, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


class Probe(pl.Callback):
    """Records, before every training step, whether the model is pruned and that the optimizer holds exactly the
    module's parameters."""

    def __init__(self) -> None:
        self.steps: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        held = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
        assert {id(p) for p in held} == {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.steps.append(current_structure(pl_module.model) is not None)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CHAIN))
def test_prunes_at_epoch_k_and_the_checkpoint_rebuilds_it(tmp_path, family: str) -> None:
    module, probe = _classifier(family), Probe()
    pruning = StructuredPruning(ratio=0.25, importance="taylor", calibration_batches=1, at_epoch=1)
    trainer = _trainer(tmp_path, 2, [pruning, probe])
    trainer.fit(module, datamodule=_digits(family))
    assert probe.steps == [False, False, True, True]
    assert pruning.result.params_after < pruning.result.params_before
    assert pruning.structure["family"] == family
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)[STRUCTURE_KEY] == current_structure(module.model)
    loaded = ViTClassifier.from_checkpoint(path)
    images = torch.randn(2, 1, CHAIN[family][2], CHAIN[family][2])
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module(images), rtol=0, atol=0)


def test_an_option_the_family_cannot_take_is_refused_before_training(tmp_path) -> None:
    module, probe = _classifier("efficientvit_msra"), Probe()
    trainer = _trainer(tmp_path, 1, [StructuredPruning(ratio=0.25, prune_heads=True), probe])
    with pytest.raises(
        UnsupportedModelError,
        match=r"^prune_heads=True is invalid; accepted: prune_heads=False for efficientvit_msra \(no block of it "
        r"can remove whole heads; it prunes .*cascaded",
    ):
        trainer.fit(module, datamodule=_digits("efficientvit_msra"))
    assert probe.steps == [] and current_structure(module.model) is None


class ForeignModule(pl.LightningModule):
    """A user's own module: only the ``self.model`` contract in common with ViTClassifier."""

    def __init__(self) -> None:
        super().__init__()
        name, kwargs, _ = CHAIN["levit"]
        self.model = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kwargs)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class WeightsAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.slow
def test_foreign_module_prunes_at_fit_start_and_resumes(tmp_path) -> None:
    torch.manual_seed(0)
    module, probe = ForeignModule(), Probe()
    trainer = _trainer(tmp_path, 1, [StructuredPruning(importance="l2"), probe], limit_val_batches=0)
    trainer.fit(module, datamodule=_digits("levit"))
    assert probe.steps == [True, True]
    path = tmp_path / "foreign.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    fresh, start = ForeignModule(), WeightsAtTrainStart()
    trainer = _trainer(tmp_path, 2, [StructuredPruning(importance="l2"), start], limit_val_batches=0)
    trainer.fit(fresh, datamodule=_digits("levit"), ckpt_path=path)
    for key, value in saved["state_dict"].items():
        assert torch.equal(start.state[key], value), key
    assert current_structure(fresh.model) == saved[STRUCTURE_KEY]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["levit", "swin"])
def test_sparsity_gates_train_then_prune(tmp_path, family: str) -> None:
    module, probe = _classifier(family), Probe()
    gates = SparsityGates(ratio=0.25, prune_epoch=1, l1_lambda=1e-3)
    _trainer(tmp_path, 2, [gates, probe]).fit(module, datamodule=_digits(family))
    assert probe.steps == [False, False, True, True]
    assert not has_gates(module.model) and gates.result.params_after < gates.result.params_before


@pytest.mark.slow
def test_quantization_and_export_at_fit_end(tmp_path) -> None:
    module = _classifier("levit")
    callbacks = [
        StructuredPruning(ratio=0.25),
        Quantization(targets=["int8_dynamic:x86"]),
        MobileExport(
            formats=["executorch", "onnx"],
            output_dir=tmp_path / "out",
            executorch_precisions=["fp32"],
            onnx_precisions=["fp32"],
            val_batches=1,
        ),
    ]
    _trainer(tmp_path, 1, callbacks).fit(module, datamodule=_digits("levit"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    statuses = {a["name"]: a["status"] for a in manifest["artifacts"]}
    assert statuses == {"executorch-fp32": "ok", "onnx-fp32": "ok"}, manifest
    pte = next(a for a in manifest["artifacts"] if a["name"] == "executorch-fp32")
    assert pte["extra"]["outside_ops"] == {}


@pytest.mark.slow
def test_ddp_ranks_build_the_identical_coupling_pruned_network(tmp_path, cli, ddp_probe) -> None:
    name, kwargs, size = CHAIN["levit"]
    model_kwargs = {**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}, "in_chans": 1}
    config = textwrap.dedent(
        f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 2
          strategy: ddp
          max_epochs: 2
          limit_train_batches: 2
          limit_val_batches: 1
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: pqv_lightning.callbacks.StructuredPruning
              init_args: {{ratio: 0.25, importance: taylor, calibration_batches: 2, at_epoch: 1}}
            - class_path: ddp_probe.SaveRankState
              init_args: {{out_dir: {tmp_path}}}
        model:
          class_path: pqv_lightning.ViTClassifier
          init_args: {{model_name: {name}, num_classes: 10, model_kwargs: {json.dumps(model_kwargs)}}}
        data:
          class_path: pqv_lightning.datamodules.DigitsDataModule
          init_args: {{img_size: {size}, in_chans: 1, batch_size: 16}}
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
    dense = ViTClassifier(name, num_classes=10, model_kwargs=model_kwargs).state_dict()
    assert any(states[0][k].shape != dense[k].shape for k in dense)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
