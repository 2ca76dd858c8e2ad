"""VTP sparsity gates: exact folding, pruning by gate magnitude, structure replay, optimizer hygiene, resume."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks.sparsity_gates import SparsityGates
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.pruning import apply_structure
from pqv_lightning.pruning.gates import (
    GATE_NAME,
    attach_gates,
    fold_gates,
    gate_l1,
    gates_of,
    has_gates,
    prune_by_gates,
)

torch.set_num_threads(1)


def _vit(tiny_vit_kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs).eval()


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"l1_lambda": -1e-4}, "l1_lambda=-0.0001"),
        ({"ratio": 1.0}, "ratio=1.0"),
        ({"ratio": -0.1}, "ratio=-0.1"),
        ({"prune_epoch": 0}, "prune_epoch=0"),
        ({"round_to": 0}, "round_to=0"),
    ],
)
def test_bad_input_is_rejected_in_the_constructor(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SparsityGates(**kwargs)


def test_prune_epoch_not_before_max_epochs_fails_before_training(tiny_classifier, digits):
    with pytest.raises(ValueError, match="prune_epoch=2 is not before max_epochs=2"):
        _trainer([SparsityGates(prune_epoch=2)]).fit(tiny_classifier, datamodule=digits)
    assert not has_gates(tiny_classifier.model)


def test_gates_start_neutral_and_fold_exactly(tiny_vit_kwargs):
    model = _vit(tiny_vit_kwargs)
    x = torch.randn(4, 1, 16, 16)
    reference = model(x)
    gates = attach_gates(model)
    assert set(gates) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"}
    assert gates["blocks.0.attn.qkv"].numel() == model.blocks[0].attn.head_dim
    assert gates["blocks.0.mlp.fc2"].numel() == model.blocks[0].mlp.fc1.out_features
    torch.testing.assert_close(model(x), reference)  # initialised to 1: same function
    with torch.no_grad():
        for g in gates.values():
            g.uniform_(-1.0, 2.0)
    gated = model(x)
    assert not torch.allclose(gated, reference)
    fold_gates(model)
    assert not has_gates(model) and not any(GATE_NAME in k for k in model.state_dict())
    torch.testing.assert_close(model(x), gated, rtol=1e-5, atol=1e-5)


def test_a_copy_uses_its_own_gates(tiny_vit_kwargs):
    model = _vit(tiny_vit_kwargs)
    attach_gates(model)
    x = torch.randn(2, 1, 16, 16)
    copied = copy.deepcopy(model)
    reference = copied(x)
    with torch.no_grad():
        for g in gates_of(model).values():
            g.zero_()
    torch.testing.assert_close(copied(x), reference)


def test_l1_gradient_and_penalty(tiny_vit_kwargs):
    model = _vit(tiny_vit_kwargs)
    gates = attach_gates(model)
    assert gate_l1(model).item() == sum(g.numel() for g in gates.values())
    callback = SparsityGates(l1_lambda=0.5)
    callback._model = model
    with torch.no_grad():
        gates["blocks.0.mlp.fc2"][:3] = torch.tensor([-2.0, 0.0, 3.0])
    callback.on_before_optimizer_step(None, None, None)
    assert gates["blocks.0.mlp.fc2"].grad[:4].tolist() == [-0.5, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pruning_removes_exactly_the_smallest_gates(tiny_vit_kwargs, ratio):
    model = _vit(tiny_vit_kwargs)
    dense = copy.deepcopy(model)
    gates = attach_gates(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for g in gates.values():
            g.copy_(torch.rand(g.numel(), generator=generator) + 0.5)
            g[torch.randperm(g.numel(), generator=generator)[: int(ratio * g.numel())]] = 0.0  # dead channels
    x = torch.randn(5, 1, 16, 16)
    gated = model(x)
    result = prune_by_gates(model, ratio, x[:1])
    # Only zero-gated channels were removed, so the pruned network computes the gated function exactly.
    torch.testing.assert_close(model(x), gated, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.head_dim == round(16 * (1 - ratio))
    assert model.blocks[1].mlp.fc1.out_features == round(256 * (1 - ratio))
    assert model.embed_dim == 64 and result.params_after < result.params_before
    apply_structure(dense, result.structure)  # plain data, replayable on a dense model
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    for fused in (True, False):  # softmax scale kept on both attention paths
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        torch.testing.assert_close(model(x), gated, rtol=1e-5, atol=1e-5)


def test_fit_trains_gates_then_prunes_with_a_clean_optimizer(tmp_path, tiny_classifier, digits):
    seen: dict = {}

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            held = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
            seen[trainer.current_epoch] = (
                {id(p) for p in held},
                {id(p) for p in pl_module.parameters()},
                {id(g) for g in gates_of(pl_module.model).values()},
                [p.clone() for p in gates_of(pl_module.model).values()],
            )

    callback = SparsityGates(ratio=0.5, prune_epoch=1, l1_lambda=1e-2)
    trainer = _trainer([callback, Probe()], max_epochs=3)
    trainer.fit(tiny_classifier, datamodule=digits)
    held0, params0, gates0, _ = seen[0]
    assert gates0 and gates0 <= held0 and held0 == params0  # gates trained from the first step
    held1, params1, gates1, _ = seen[1]
    assert not gates1 and held1 == params1  # pruned: no gate, no stale parameter
    assert not has_gates(tiny_classifier.model)
    assert tiny_classifier.model.blocks[0].mlp.fc1.out_features == 128
    assert current_structure(tiny_classifier.model) is not None
    ckpt = tmp_path / "gates.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = ViTClassifier.from_checkpoint(ckpt).eval()
    tiny_classifier.eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(restored(x), tiny_classifier(x))


@pytest.mark.slow
def test_resume_before_and_after_pruning(tmp_path, tiny_vit_kwargs, digits):
    def make():
        return ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)

    checkpoints = ModelCheckpoint(
        dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="e{epoch}", auto_insert_metric_name=False
    )
    _trainer([SparsityGates(ratio=0.5, prune_epoch=2), checkpoints], max_epochs=3, enable_checkpointing=True).fit(
        make(), datamodule=digits
    )
    before, after = tmp_path / "e0.ckpt", tmp_path / "e2.ckpt"
    assert GATE_NAME in "".join(torch.load(before, weights_only=True)["state_dict"])
    for ckpt in (before, after):
        module = make()
        _trainer([SparsityGates(ratio=0.5, prune_epoch=2)], max_epochs=4).fit(module, datamodule=digits, ckpt_path=ckpt)
        assert not has_gates(module.model)
        assert module.model.blocks[0].mlp.fc1.out_features == 128
