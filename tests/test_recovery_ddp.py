"""KnowledgeDistillation and SparsityGates under 2-process CPU DDP through the CLI (the teacher in a side file,
never in a checkpoint), and their bad-input checks."""

from __future__ import annotations

import hashlib
import math
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.sparsity_gates import SparsityGates
from pqv_lightning.checkpoint import STRUCTURE_KEY
from pqv_lightning.pruning.gates import GATE_NAME, attach_gates, has_gates, prune_by_gates

torch.set_num_threads(1)

TRAIN_BATCHES = 2  # per rank and epoch

# Each rank writes what it saw to <out_dir>/rank<r>.pt: per-epoch shapes and optimizer contents (at the first
# batch of the epoch, after every epoch-start hook), the model just before each epoch-end hook (listed before the
# pruning callbacks, so before pruning), and at train end its state, attention sizes, logits on fixed images, its
# teacher and what DDP and the optimizers hold.
PROBE_MODULE = """
import torch
from ddp_probe import ddp_wrapped_params, held_params, save_rank_report, stale_optimizer_params, state_of
from lightning.pytorch import Callback

from pqv_lightning.checkpoint import current_structure
from pqv_lightning.pruning.gates import gates_of


class RankProbe(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.epochs = []
        self.before_epoch_end = {}
        self.start = {}

    def on_train_start(self, trainer, pl_module):
        self.start = {"global_step": trainer.global_step, "state": state_of(pl_module)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        held = held_params(trainer)
        model = pl_module.model
        self.epochs.append({
            "epoch": trainer.current_epoch,
            "qkv": list(model.blocks[0].attn.qkv.weight.shape),
            "fc1": list(model.blocks[0].mlp.fc1.weight.shape),
            "pruned": current_structure(model) is not None,
            "gates": len(gates_of(model)),
            "gates_in_optimizer": sum(any(p is g for p in held) for g in gates_of(model).values()),
            "optimizer_is_model": sorted(map(id, held)) == sorted(id(p) for p in pl_module.parameters()),
        })

    def on_train_epoch_end(self, trainer, pl_module):
        self.before_epoch_end[trainer.current_epoch] = state_of(pl_module.model)

    def on_train_end(self, trainer, pl_module):
        held = held_params(trainer)
        kd = [cb for cb in trainer.callbacks if type(cb).__name__ == "KnowledgeDistillation"]
        teacher = kd[0].teacher if kd else None
        term = trainer.callback_metrics.get("train/distill_term")
        # What a state dict does not show (DDP broadcasts no attribute): the attention sizes and the function.
        images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module.model(images.to(pl_module.device)).cpu()
        pl_module.train(was_training)
        attention = [[b.attn.num_heads, b.attn.head_dim, float(b.attn.scale)] for b in pl_module.model.blocks]
        report = {
            "epochs": self.epochs,
            "start": self.start,
            "before_epoch_end": self.before_epoch_end,
            "state": state_of(pl_module),
            "structure": current_structure(pl_module.model),
            "logits": logits,
            "attention": attention,
            "global_step": trainer.global_step,
            "stale_optimizer_params": stale_optimizer_params(trainer, pl_module),
            "ddp_wrapped_params": ddp_wrapped_params(trainer),
            "module_params": sum(p.numel() for p in pl_module.parameters()),
            "teacher": None if teacher is None else state_of(teacher),
            "teacher_in_optimizer": 0 if teacher is None else sum(
                any(p is q for q in held) for p in teacher.parameters()
            ),
            "teacher_trainable": 0 if teacher is None else sum(p.requires_grad for p in teacher.parameters()),
            "teacher_training": bool(teacher is not None and teacher.training),
            "distill_term": None if term is None else float(term),
        }
        save_rank_report(trainer, report, self.out_dir)
"""

MODEL_KWARGS = "{img_size: 16, patch_size: 4, in_chans: 1, depth: 2, embed_dim: 64, num_heads: 4}"


def ddp_config(out_dir: Path, ckpt_dir: Path, callbacks: str, max_epochs: int) -> str:
    """A tiny 2-process CPU DDP fit: the probe first, then ``callbacks`` (YAML list items), then checkpoints.

    Checkpoints are written after each validation, so before the epoch-end hooks (where pruning happens).
    """
    head = textwrap.dedent(
        f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 2
          strategy: ddp
          max_epochs: {max_epochs}
          limit_train_batches: {TRAIN_BATCHES}
          limit_val_batches: 1
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: recovery_probe.RankProbe
              init_args: {{out_dir: "{out_dir}"}}
        """
    )
    tail = textwrap.dedent(
        f"""\
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: "{ckpt_dir}", filename: "e{{epoch}}", save_top_k: -1,
                           auto_insert_metric_name: false, save_on_train_epoch_end: false}}
        model:
          class_path: pqv_lightning.ViTClassifier
          init_args:
            model_name: vit_tiny_patch16_224
            num_classes: 10
            model_kwargs: {MODEL_KWARGS}
            warmup_epochs: 0
        data:
          class_path: pqv_lightning.datamodules.DigitsDataModule
          init_args: {{img_size: 16, in_chans: 1, batch_size: 16}}
        """
    )
    return head + textwrap.indent(textwrap.dedent(callbacks), "    ") + tail


def _write_probes(folder: Path) -> None:
    """This module's probe and the shared DDP helpers it imports, where the CLI subprocess imports them."""
    (folder / "recovery_probe.py").write_text(PROBE_MODULE)
    (folder / "ddp_probe.py").write_text((Path(__file__).parent / "ddp_probe.py").read_text())


def run_ddp(cli, tmp_path: Path, name: str, callbacks: str, max_epochs: int, ckpt_path: Path | None = None):
    """Run ``train.py fit`` under 2-process DDP; return (completed process, [rank0 report, rank1 report])."""
    _write_probes(tmp_path)
    out = tmp_path / name
    out.mkdir()
    config = tmp_path / f"{name}.yaml"
    config.write_text(ddp_config(out, tmp_path / "ckpt", callbacks, max_epochs))
    args = ["fit", "--config", str(config)] + ([f"--ckpt_path={ckpt_path}"] if ckpt_path else [])
    done = cli(args, cwd=tmp_path, timeout=300, extra_env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same_on_both_ranks(reports: list[dict]) -> None:
    first, second = (r["state"] for r in reports)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert reports[0]["structure"] == reports[1]["structure"]
    assert reports[0]["attention"] == reports[1]["attention"]
    torch.testing.assert_close(reports[0]["logits"], reports[1]["logits"], rtol=0, atol=0)
    assert reports[0]["epochs"] == reports[1]["epochs"]
    for report in reports:
        assert report["stale_optimizer_params"] == 0
        assert report["ddp_wrapped_params"] == report["module_params"]  # DDP wraps the student only


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # plain data: no pickled module, no teacher object


def tensors_in(value) -> Iterator[torch.Tensor]:
    """Every tensor anywhere in a loaded checkpoint: dict values, list / tuple items, at any depth."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from tensors_in(item)


def assert_no_teacher_tensor(checkpoint: dict, teacher: dict[str, torch.Tensor]) -> None:
    """No tensor of the checkpoint, at any depth (weights, optimizer state, callback states, ...), is a teacher's."""
    found = list(tensors_in(checkpoint))
    assert len(found) > len(checkpoint["state_dict"])  # the walk reaches the optimizer state too
    for name, weight in teacher.items():
        assert not any(t.shape == weight.shape and torch.equal(t, weight) for t in found), name


# ------------------------------------------------------------------------------ pruning at epoch K + distillation
KD_CALLBACKS = """\
- class_path: pqv_lightning.callbacks.StructuredPruning
  init_args: {ratio: 0.25, importance: l2, at_epoch: 1}
- class_path: pqv_lightning.callbacks.KnowledgeDistillation
  init_args: {mode: soft, temperature: 2.0, alpha: 0.5}
"""


@pytest.mark.slow
def test_ddp_pruning_at_epoch_k_distils_from_the_dense_model_and_resumes(tmp_path, cli):
    done, reports = run_ddp(cli, tmp_path, "fit", KD_CALLBACKS, max_epochs=2)
    assert_same_on_both_ranks(reports)
    rank0 = reports[0]
    assert [(e["epoch"], e["pruned"], e["qkv"]) for e in rank0["epochs"]] == [
        (0, False, [192, 64]),
        (1, True, [144, 48]),
    ]
    assert all(e["optimizer_is_model"] for e in rank0["epochs"])
    assert rank0["global_step"] == 2 * TRAIN_BATCHES
    assert rank0["attention"] == [[4, 12, pytest.approx(12**-0.5)]] * 2

    # The teacher: on every rank, the model exactly as it was just before pruning (dense shapes, trained weights),
    # frozen, in eval mode, outside the optimizers and outside DDP; the distillation term was in the loss.
    dense = rank0["before_epoch_end"][0]
    for report in reports:
        teacher = report["teacher"]
        assert teacher.keys() == dense.keys()
        for key, value in dense.items():
            assert torch.equal(teacher[key], value), key
        assert report["teacher_in_optimizer"] == report["teacher_trainable"] == 0
        assert not report["teacher_training"]
        assert report["distill_term"] is not None and report["distill_term"] > 0
    assert teacher["blocks.0.attn.qkv.weight"].shape == (192, 64)
    assert rank0["state"]["model.blocks.0.attn.qkv.weight"].shape == (144, 48)
    assert "KnowledgeDistillation: soft (T=2, alpha=0.5) from the dense model" in done.stdout + done.stderr

    # The checkpoint: the pruned student's weights and structure; no teacher tensor in its state_dict.
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "e1.ckpt")
    assert checkpoint[STRUCTURE_KEY] == rank0["structure"]
    state_dict = checkpoint["state_dict"]
    assert set(state_dict) == {f"model.{key}" for key in dense}  # the student's timm model, nothing else
    for key, value in rank0["state"].items():
        assert torch.equal(state_dict[key], value), key
    # No teacher tensor anywhere in the checkpoint after pruning (the one before holds the dense student: the
    # teacher-to-be). The teacher captured at pruning was written once, by rank 0, next to the run
    # (<log dir>/distillation, the log dir here the working directory); the checkpoint records that file.
    assert "KnowledgeDistillation" not in load_checkpoint(tmp_path / "ckpt" / "e0.ckpt")["callbacks"]  # not yet
    assert_no_teacher_tensor(checkpoint, dense)
    files = list((tmp_path / "distillation").iterdir())
    assert [f.name for f in files] == [f"teacher-{hashlib.sha256(files[0].read_bytes()).hexdigest()[:16]}.pt"]
    record = checkpoint["callbacks"]["KnowledgeDistillation"]
    assert record == {
        "path": str(files[0]),
        "relative": f"distillation/{files[0].name}",
        "sha256": hashlib.sha256(files[0].read_bytes()).hexdigest(),
        "parameters": sum(v.numel() for v in dense.values()),
        "classes": 10,
    }
    saved_teacher = torch.load(files[0], weights_only=True)
    assert saved_teacher.keys() == dense.keys() and all(torch.equal(saved_teacher[k], v) for k, v in dense.items())

    # Resume after pruning on a fresh dense module: same structure, the checkpoint's weights, the same teacher (read
    # from its file, sha256 checked, on both ranks), and no new teacher file.
    done, resumed = run_ddp(
        cli, tmp_path, "resume", KD_CALLBACKS, max_epochs=3, ckpt_path=tmp_path / "ckpt" / "e1.ckpt"
    )
    assert (
        f"KnowledgeDistillation: resuming with the teacher in {files[0]} (sha256 checked)" in done.stdout + done.stderr
    )
    assert list((tmp_path / "distillation").iterdir()) == files
    resumed_checkpoint = load_checkpoint(tmp_path / "ckpt" / "e2.ckpt")
    assert resumed_checkpoint["callbacks"]["KnowledgeDistillation"] == record
    assert_no_teacher_tensor(resumed_checkpoint, dense)
    assert_same_on_both_ranks(resumed)
    for report in resumed:
        assert report["start"]["global_step"] == 2 * TRAIN_BATCHES
        assert report["start"]["state"].keys() == state_dict.keys()
        assert all(torch.equal(report["start"]["state"][k], v) for k, v in state_dict.items())
        assert [(e["epoch"], e["qkv"]) for e in report["epochs"]] == [(2, [144, 48])]
        assert report["structure"] == checkpoint[STRUCTURE_KEY]
        assert all(torch.equal(report["teacher"][k], v) for k, v in dense.items())
        assert report["distill_term"] is not None and report["distill_term"] > 0
    assert resumed[0]["global_step"] == 3 * TRAIN_BATCHES


# ------------------------------------------------------------------------------------------ VTP gates mid-fit
GATES_CALLBACKS = """\
- class_path: pqv_lightning.callbacks.SparsityGates
  init_args: {ratio: 0.25, prune_epoch: 1, l1_lambda: 0.01}
"""


@pytest.mark.slow
def test_ddp_sparsity_gates_prune_mid_fit_identically_and_resume(tmp_path, cli, tiny_vit_kwargs):
    _, reports = run_ddp(cli, tmp_path, "fit", GATES_CALLBACKS, max_epochs=2)
    assert_same_on_both_ranks(reports)
    rank0 = reports[0]
    # Epoch 0 trains the 4 gates (in the optimizer); epoch 1 finetunes the pruned model, no gate anywhere.
    assert [(e["epoch"], e["gates"], e["gates_in_optimizer"], e["pruned"]) for e in rank0["epochs"]] == [
        (0, 4, 4, False),
        (1, 0, 0, True),
    ]
    assert all(e["optimizer_is_model"] for e in rank0["epochs"])
    assert rank0["epochs"][1]["qkv"] == [144, 64] and rank0["epochs"][1]["fc1"] == [192, 64]  # embedding kept
    assert not any(GATE_NAME in key for key in rank0["state"])
    assert rank0["attention"] == [[4, 12, pytest.approx(12**-0.5)]] * 2  # 4 heads of 12 dims, both attention paths

    # The gates were trained away from 1 and are identical on both ranks (DDP-averaged gradients + the same L1).
    gated = [r["before_epoch_end"][0] for r in reports]
    gate_keys = [k for k in gated[0] if k.endswith(GATE_NAME)]
    assert len(gate_keys) == 4
    for key in gate_keys:
        assert torch.equal(gated[0][key], gated[1][key]), key
        assert not torch.equal(gated[0][key], torch.ones_like(gated[0][key])), key

    # Rank 0 chose the channels with the smallest gates: pruning its gated model here gives the same structure.
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs)
    attach_gates(reference)
    reference.load_state_dict(gated[0])
    expected = prune_by_gates(reference, 0.25, torch.randn(1, 1, 16, 16)).structure
    assert rank0["structure"] == expected

    before, after = (load_checkpoint(tmp_path / "ckpt" / f"e{e}.ckpt") for e in (0, 1))
    assert STRUCTURE_KEY not in before and sum(GATE_NAME in k for k in before["state_dict"]) == 4
    assert after[STRUCTURE_KEY] == expected
    assert after["state_dict"].keys() == rank0["state"].keys()
    assert all(torch.equal(after["state_dict"][k], v) for k, v in rank0["state"].items())
    loaded = ViTClassifier.from_checkpoint(tmp_path / "ckpt" / "e1.ckpt")
    assert not has_gates(loaded.model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rank0["state"].items())

    # Resume from the gated checkpoint written before pruning: both ranks restore the trained gates, prune at the
    # next epoch start and reach the very structure of the uninterrupted run.
    _, resumed = run_ddp(
        cli, tmp_path, "resume", GATES_CALLBACKS, max_epochs=2, ckpt_path=tmp_path / "ckpt" / "e0.ckpt"
    )
    assert_same_on_both_ranks(resumed)
    for report in resumed:
        assert report["start"]["global_step"] == TRAIN_BATCHES
        assert all(torch.equal(report["start"]["state"]["model." + k], v) for k, v in gated[0].items())
        assert [(e["epoch"], e["gates"], e["pruned"]) for e in report["epochs"]] == [(1, 0, True)]
        assert report["structure"] == expected
        assert not any(GATE_NAME in key for key in report["state"])


# ------------------------------------------------------------------------------ bad input, under DDP and in-process
TEACHER_WITH_OTHER_CLASSES = """\
- class_path: pqv_lightning.callbacks.KnowledgeDistillation
  init_args: {teacher: TEACHER}
"""


@pytest.mark.slow
def test_ddp_teacher_with_other_classes_fails_on_every_rank_before_training(tmp_path, cli, tiny_vit_kwargs):
    """Both ranks load the teacher and refuse it in setup: a clear error, no hang, no training step."""
    teacher = tmp_path / "five_classes.ckpt"
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=5, model_kwargs=tiny_vit_kwargs)
    trainer = pl.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(teacher)
    callbacks = TEACHER_WITH_OTHER_CLASSES.replace("TEACHER", str(teacher))
    _write_probes(tmp_path)
    (tmp_path / "out").mkdir()
    config = tmp_path / "bad.yaml"
    config.write_text(ddp_config(tmp_path / "out", tmp_path / "ckpt", callbacks, max_epochs=2))
    done = cli(["fit", "--config", str(config)], cwd=tmp_path, timeout=120, extra_env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    message = r"The teacher predicts 5 classes but the student 10.*accepted: a teacher with 10 classes"
    for rank in (0, 1):
        assert re.search(rf"pqv: error \[rank {rank}/2\]: {message}", done.stderr), done.stderr[-4000:]
    assert not list((tmp_path / "out").iterdir()) and not (tmp_path / "ckpt").exists()  # no training, no checkpoint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, r"temperature=0 is invalid; accepted: a finite number > 0"),
        ({"temperature": -2.0}, r"temperature=-2.0 is invalid; accepted: a finite number > 0"),
        ({"temperature": math.inf}, r"temperature=inf is invalid; accepted: a finite number > 0"),
        ({"temperature": math.nan}, r"temperature=nan is invalid"),
        ({"alpha": -0.01}, r"alpha=-0.01 is invalid; accepted: a number in \[0, 1\]"),
        ({"alpha": 1.01}, r"alpha=1.01 is invalid; accepted: a number in \[0, 1\]"),
        ({"alpha": math.nan}, r"alpha=nan is invalid; accepted: a number in \[0, 1\]"),
        ({"mode": "soft_hard"}, r"mode='soft_hard' is invalid; accepted: soft, hard"),
    ],
)
def test_distillation_bad_input_names_the_value_and_the_accepted_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(**kwargs)


@pytest.mark.parametrize("alpha", [0, 0.0, 1, 1.0])
def test_distillation_alpha_bounds_are_accepted(alpha):
    assert KnowledgeDistillation(alpha=alpha).alpha == float(alpha)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l1_lambda": -1e-6}, r"l1_lambda=-1e-06 is invalid; accepted: a finite number >= 0"),
        ({"l1_lambda": math.inf}, r"l1_lambda=inf is invalid; accepted: a finite number >= 0"),
        ({"l1_lambda": math.nan}, r"l1_lambda=nan is invalid"),
        ({"prune_epoch": 0}, r"prune_epoch=0 is invalid; accepted: an int >= 1"),
        ({"global_pruning": "yes"}, r"global_pruning='yes' is invalid; accepted: True or False"),
    ],
)
def test_gates_bad_input_names_the_value_and_the_accepted_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsityGates(**kwargs)


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)


class StepCounter(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize("max_epochs", [3, 4])
def test_gate_epoch_at_or_after_the_last_epoch_fails_in_setup(tiny_classifier, digits, max_epochs):
    counter = StepCounter()
    with pytest.raises(ValueError, match=rf"prune_epoch=4 is not before max_epochs={max_epochs}.*prune_epoch < "):
        _trainer([SparsityGates(prune_epoch=4), counter], max_epochs=max_epochs).fit(tiny_classifier, datamodule=digits)
    assert counter.steps == 0 and not has_gates(tiny_classifier.model)


def test_gate_epoch_beyond_max_steps_fails_before_the_first_step(tiny_classifier, digits):
    """With only ``max_steps`` (3 steps an epoch here), epoch 2 is never reached: refused before any step."""
    counter = StepCounter()
    trainer = _trainer([SparsityGates(prune_epoch=2), counter], max_epochs=None, max_steps=6)
    with pytest.raises(ValueError, match=r"prune_epoch=2 needs 6 training steps \(3 an epoch\).*max_steps=6"):
        trainer.fit(tiny_classifier, datamodule=digits)
    assert counter.steps == 0 and not has_gates(tiny_classifier.model)
    # One more step leaves a step of finetuning after pruning: accepted.
    trainer = _trainer([SparsityGates(prune_epoch=2)], max_epochs=None, max_steps=7)
    trainer.fit(tiny_classifier, datamodule=digits)
    assert trainer.global_step == 7 and not has_gates(tiny_classifier.model)
    assert tiny_classifier.model.blocks[0].mlp.fc1.out_features == 192
