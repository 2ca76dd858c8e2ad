"""KnowledgeDistillation: loss terms, teacher capture (any callback order), isolation, opt-in, bad input, and the
captured teacher as a side file (never in a checkpoint) that a resumed run finds, checks and distils from."""

from __future__ import annotations

import copy
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.distillation import distill, distillation_term, load_teacher, load_teacher_state

torch.set_num_threads(1)


def _trainer(callbacks, root: Path, **kwargs) -> pl.Trainer:
    """A tiny CPU fit whose log dir (where captured teachers go) is ``root``."""
    defaults = dict(
        default_root_dir=root,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def tensors_in(value) -> Iterator[torch.Tensor]:
    """Every tensor anywhere in a (loaded) checkpoint: dict values, list / tuple items, nested at any depth."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from tensors_in(item)


def assert_no_teacher_tensor(checkpoint: dict, teacher_state: dict[str, torch.Tensor]) -> None:
    """No tensor of the checkpoint, at any depth, is one of the teacher's (same shape and values).

    The one exception is the student's own copy of a layer pruning left alone and training has not changed yet
    (e.g. the classifier bias right after pruning): ``state_dict["model.<name>"]``, once.
    """
    student = checkpoint["state_dict"]
    rest = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    found = [(None, t) for t in tensors_in(rest)] + list(student.items())
    assert student and all(isinstance(t, torch.Tensor) for t in student.values())
    for name, weight in teacher_state.items():
        clashes = [
            key for key, t in found if key != f"model.{name}" and t.shape == weight.shape and torch.equal(t, weight)
        ]
        assert not clashes, f"the checkpoint holds the teacher's {name} ({clashes})"


def assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key].cpu(), value.cpu()), key


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"temperature": 0}, "temperature=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"alpha": -0.1}, "alpha=-0.1"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"mode": "medium"}, "mode='medium'"),
        ({"teacher": 3}, "teacher=3"),
    ],
)
def test_bad_input_is_rejected_in_the_constructor(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        KnowledgeDistillation(**kwargs)


def test_soft_and_hard_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    t = 3.0
    p_t = F.softmax(teacher / t, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distillation_term(student, teacher, "soft", t), expected)
    assert distillation_term(teacher, teacher, "soft", t).abs() < 1e-6
    torch.testing.assert_close(
        distillation_term(student, teacher, "hard"), F.cross_entropy(student, teacher.argmax(-1))
    )


@pytest.mark.parametrize("kd_first", [True, False])
def test_teacher_is_the_dense_model_before_pruning_in_any_order(tmp_path, tiny_classifier, digits, kd_first):
    dense_state = copy.deepcopy(tiny_classifier.model.state_dict())
    kd, sp = KnowledgeDistillation(), StructuredPruning(ratio=0.5)
    held: dict = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            held["optimizer"] = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}

    trainer = _trainer([kd, sp, Probe()] if kd_first else [sp, kd, Probe()], tmp_path)
    trainer.fit(tiny_classifier, datamodule=digits)
    teacher = kd.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, dense_state[key])  # dense shapes and the weights before pruning
    assert tiny_classifier.model.blocks[0].mlp.fc1.out_features < teacher.blocks[0].mlp.fc1.out_features
    assert not held["optimizer"] & {id(p) for p in teacher.parameters()}
    assert all(m is not teacher for m in tiny_classifier.modules())
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    assert set(checkpoint["state_dict"]) == set(tiny_classifier.state_dict())
    assert_no_teacher_tensor(checkpoint, dense_state)
    assert "train/distill_term" in trainer.callback_metrics
    # Pruned at fit start: the teacher was written once, at train start, to the run's log dir.
    assert [f.name for f in (tmp_path / "distillation").iterdir()] == [kd.teacher_file.name]
    assert_state_equal(
        load_teacher_state(kd.teacher_file, checkpoint["callbacks"]["KnowledgeDistillation"]["sha256"]), dense_state
    )


def test_without_pruning_the_teacher_is_the_model_at_setup_and_changes_the_loss(tmp_path, tiny_classifier, digits):
    kd = KnowledgeDistillation(mode="hard", alpha=1.0)
    initial = copy.deepcopy(tiny_classifier.model)
    _trainer([kd], tmp_path).fit(tiny_classifier, datamodule=digits)
    for a, b in zip(kd.teacher.parameters(), initial.parameters()):
        torch.testing.assert_close(a, b)
    # Attached: the module's loss is (1 - alpha) * labels + alpha * hard term; alpha=1 leaves the term only.
    images, labels = next(iter(digits.train_dataloader()))
    from pqv_lightning.distillation import Distiller, attach_distiller, detach_distiller

    attach_distiller(tiny_classifier, Distiller(copy.deepcopy(initial), mode="hard", alpha=1.0))
    tiny_classifier.train()
    logits = tiny_classifier(images)
    loss = distill(tiny_classifier, images, logits, F.cross_entropy(logits, labels))
    torch.testing.assert_close(loss, F.cross_entropy(logits, initial.eval()(images).argmax(-1)))
    detach_distiller(tiny_classifier)
    assert distill(tiny_classifier, images, logits, torch.tensor(1.5)) == 1.5


class _Foreign(pl.LightningModule):
    def __init__(self, call_distill: bool) -> None:
        super().__init__()
        self.model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1, depth=1,
            embed_dim=32, num_heads=2, num_classes=10,
        )  # fmt: skip
        self.call_distill = call_distill
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        return distill(self, images, logits, loss) if self.call_distill else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_module_that_has_not_opted_in_fails_at_setup(tmp_path, digits):
    module = _Foreign(call_distill=True)
    with pytest.raises(TypeError, match="supports_distillation = True"):
        _trainer([KnowledgeDistillation()], tmp_path).fit(module, datamodule=digits)
    assert module.steps == 0


def test_a_foreign_module_opts_in_with_two_lines(tmp_path, digits):
    class OptedIn(_Foreign):
        supports_distillation = True

    module = OptedIn(call_distill=True)
    kd = KnowledgeDistillation()
    _trainer([kd], tmp_path).fit(module, datamodule=digits)
    assert module.steps == 2 and "train/distill_term" in _trainer_metrics(kd)

    forgot = OptedIn(call_distill=False)
    with pytest.raises(RuntimeError, match="did not call"):
        _trainer([KnowledgeDistillation()], tmp_path).fit(forgot, datamodule=digits)


def _trainer_metrics(kd: KnowledgeDistillation) -> dict:
    return {"train/distill_term": kd.distiller.last_term} if kd.distiller.last_term is not None else {}


def test_teacher_from_checkpoint_and_state_dict_files(tmp_path, tiny_vit_kwargs, digits):
    teacher_module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)
    trainer = _trainer([], tmp_path)
    trainer.fit(teacher_module, datamodule=digits)
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_teacher(ckpt)
    images = torch.randn(3, 1, 16, 16)
    teacher_module.eval()
    torch.testing.assert_close(loaded(images), teacher_module(images))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    weights = tmp_path / "teacher.pth"
    torch.save(teacher_module.model.state_dict(), weights)
    from_state = load_teacher(weights, {"model_name": "vit_tiny_patch16_224", "num_classes": 10, **tiny_vit_kwargs})
    torch.testing.assert_close(from_state(images), teacher_module(images))

    with pytest.raises(ValueError, match="teacher_kwargs"):
        load_teacher(weights)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_teacher(tmp_path / "missing.ckpt")

    student = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)
    kd = KnowledgeDistillation(teacher=str(ckpt), alpha=0.7)
    trainer = _trainer([kd], tmp_path)
    trainer.fit(student, datamodule=digits)
    torch.testing.assert_close(kd.teacher(images), teacher_module(images))
    # A teacher given as a file is not written again: the state names its source, plain data.
    assert kd.teacher_file is None and not (tmp_path / "distillation").exists()
    assert trainer._checkpoint_connector.dump_checkpoint()["callbacks"]["KnowledgeDistillation"] == {
        "source": str(ckpt)
    }


def test_teacher_with_other_classes_is_rejected_at_setup(tmp_path, tiny_vit_kwargs, digits):
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **tiny_vit_kwargs)
    weights = tmp_path / "five.pth"
    torch.save(other.state_dict(), weights)
    kd = KnowledgeDistillation(
        teacher=str(weights), teacher_kwargs={"model_name": "vit_tiny_patch16_224", "num_classes": 5, **tiny_vit_kwargs}
    )
    student = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)
    with pytest.raises(ValueError, match="teacher predicts 5 classes but the student 10"):
        _trainer([kd], tmp_path).fit(student, datamodule=digits)


# ---------------------------------------------------------- the captured teacher: a side file, never in a checkpoint
MODEL_KWARGS = {"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 64, "num_heads": 4}


def _student() -> ViTClassifier:
    return ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(MODEL_KWARGS))


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def _prune_and_distil(root: Path, max_epochs: int = 2, ckpt_path: Path | None = None, **kd_kwargs):
    """Prune at the start of epoch 1 with the dense model as teacher; checkpoints after every epoch in
    root/checkpoints (e0 holds the dense model, later ones the pruned one and the teacher record)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kd, counter = KnowledgeDistillation(**kd_kwargs), StepCounter()
    checkpoints = ModelCheckpoint(
        dirpath=root / "checkpoints", filename="e{epoch}", save_top_k=-1, auto_insert_metric_name=False
    )
    trainer = _trainer(
        [StructuredPruning(ratio=0.5, at_epoch=1), kd, counter, checkpoints],
        root,
        max_epochs=max_epochs,
        enable_checkpointing=True,
    )
    module = _student()
    trainer.fit(module, datamodule=_digits(), ckpt_path=ckpt_path)
    return kd, trainer, counter


def _digits():
    from pqv_lightning.datamodules import DigitsDataModule

    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    """One pruning + distillation fit; its checkpoints, its teacher file and the dense teacher's weights."""
    root = tmp_path_factory.mktemp("first_run")
    kd, trainer, _ = _prune_and_distil(root)
    return {
        "root": root,
        "checkpoints": sorted((root / "checkpoints").glob("e*.ckpt")),
        "pruned": root / "checkpoints" / "e1.ckpt",  # the first checkpoint written after pruning
        "teacher": {k: v.detach().clone() for k, v in kd.teacher.state_dict().items()},
        "file": kd.teacher_file,
        "student_qkv": tuple(trainer.lightning_module.model.blocks[0].attn.qkv.weight.shape),
    }


def _record(checkpoint_path: Path) -> dict:
    return torch.load(checkpoint_path, weights_only=True)["callbacks"]["KnowledgeDistillation"]


def test_checkpoints_hold_no_teacher_tensor_and_the_file_holds_the_teacher(first_run):
    teacher = first_run["teacher"]
    assert teacher["blocks.0.attn.qkv.weight"].shape == (192, 64) and first_run["student_qkv"] == (96, 32)
    assert [c.name for c in first_run["checkpoints"]] == ["e0.ckpt", "e1.ckpt"]
    dense = torch.load(first_run["checkpoints"][0], weights_only=True)
    assert_no_teacher_tensor(dense, teacher)
    assert "KnowledgeDistillation" not in dense["callbacks"]  # the dense epoch: no teacher yet
    for path in first_run["checkpoints"][1:]:
        checkpoint = torch.load(path, weights_only=True)
        assert_no_teacher_tensor(checkpoint, teacher)
        record = checkpoint["callbacks"]["KnowledgeDistillation"]
        assert set(record) == {"path", "relative", "sha256", "parameters", "classes"}
        assert not any(isinstance(v, torch.Tensor) for v in record.values())
        assert record["parameters"] == sum(v.numel() for v in teacher.values()) and record["classes"] == 10
    # Written once (rank 0, atomically: no temp file left) under the run's log dir, named by its content.
    file = first_run["file"]
    assert record["path"] == str(file) and record["relative"] == f"distillation/{file.name}"
    assert [f.name for f in (first_run["root"] / "distillation").iterdir()] == [file.name]
    sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["sha256"] == sha256 and file.name == f"teacher-{sha256[:16]}.pt"
    assert_state_equal(torch.load(file, weights_only=True), teacher)


def test_resume_distils_from_the_original_teacher_file(first_run, tmp_path):
    """Resumed past pruning in another log dir: the recorded file is loaded, checked and used; nothing is rewritten."""
    kd, trainer, counter = _prune_and_distil(tmp_path, max_epochs=4, ckpt_path=first_run["pruned"])
    assert counter.steps == 2 * 2  # epochs 2 and 3
    assert_state_equal(kd.teacher.state_dict(), first_run["teacher"])
    assert kd.teacher_file == first_run["file"] and not (tmp_path / "distillation").exists()
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    assert "train/distill_term" in trainer.callback_metrics
    assert _record(tmp_path / "checkpoints" / "e3.ckpt") == _record(first_run["pruned"])
    assert_no_teacher_tensor(torch.load(tmp_path / "checkpoints" / "e3.ckpt", weights_only=True), first_run["teacher"])


def _checkpoint_with_record(first_run, target: Path, **changes) -> Path:
    """A copy of the first run's first pruned checkpoint at ``target`` whose teacher record has ``changes``."""
    checkpoint = torch.load(first_run["pruned"], weights_only=True)
    checkpoint["callbacks"]["KnowledgeDistillation"].update(changes)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def test_missing_teacher_file_fails_before_training_and_an_explicit_teacher_resumes(first_run, tmp_path):
    gone = tmp_path / "elsewhere" / "distillation" / first_run["file"].name
    ckpt = _checkpoint_with_record(first_run, tmp_path / "run" / "e0.ckpt", path=str(gone))
    with pytest.raises(FileNotFoundError) as error:
        _prune_and_distil(tmp_path / "resume", max_epochs=4, ckpt_path=ckpt)
    message = str(error.value)
    assert str(gone) in message and "Restore that file" in message and "teacher=<checkpoint" in message
    assert str(tmp_path / "run" / "distillation" / first_run["file"].name) in message  # where else it looked
    # The way out: an explicit teacher replaces the recorded one (here the first run's last checkpoint).
    kd, _, counter = _prune_and_distil(
        tmp_path / "explicit", max_epochs=4, ckpt_path=ckpt, teacher=str(first_run["checkpoints"][1])
    )
    assert counter.steps == 4 and kd.teacher_file is None
    assert kd.teacher.blocks[0].attn.qkv.weight.shape == first_run["student_qkv"]  # that checkpoint


def test_changed_teacher_file_fails_before_training(first_run, tmp_path):
    """Found next to the moved checkpoint but not the recorded bytes: refused, naming the file."""
    run = tmp_path / "run"
    ckpt = _checkpoint_with_record(first_run, run / "checkpoints" / "e0.ckpt", path=str(tmp_path / "gone.pt"))
    other = run / "distillation" / first_run["file"].name
    other.parent.mkdir()
    torch.save({k: v + 1 for k, v in first_run["teacher"].items()}, other)
    counter = StepCounter()
    with pytest.raises(ValueError, match=r"teacher file .*is not the one the resumed checkpoint recorded") as error:
        _trainer(
            [StructuredPruning(ratio=0.5, at_epoch=1), KnowledgeDistillation(), counter], tmp_path, max_epochs=3
        ).fit(_student(), datamodule=_digits(), ckpt_path=ckpt)
    assert str(other) in str(error.value) and "teacher=<checkpoint" in str(error.value)
    assert counter.steps == 0


def test_a_moved_run_directory_still_resumes(tmp_path):
    """The record's path is gone after a move; the file is found relative to the resumed checkpoint."""
    kd, _, _ = _prune_and_distil(tmp_path / "run")
    teacher = copy.deepcopy(kd.teacher.state_dict())
    shutil.move(tmp_path / "run", tmp_path / "moved")
    kd2, _, counter = _prune_and_distil(
        tmp_path / "resume", 3, ckpt_path=tmp_path / "moved" / "checkpoints" / "e1.ckpt"
    )
    assert counter.steps == 2
    assert kd2.teacher_file == tmp_path / "moved" / "distillation" / kd.teacher_file.name
    assert_state_equal(kd2.teacher.state_dict(), teacher)


def test_a_checkpoint_with_the_teacher_inline_resumes_and_moves_it_to_a_file(first_run, tmp_path):
    """Checkpoints written before teachers became side files still resume; new checkpoints carry no teacher."""
    ckpt = tmp_path / "old.ckpt"
    checkpoint = torch.load(first_run["pruned"], weights_only=True)
    checkpoint["callbacks"]["KnowledgeDistillation"] = {"teacher": first_run["teacher"]}
    with pytest.raises(AssertionError, match="holds the teacher's"):  # what the other tests would catch
        assert_no_teacher_tensor(checkpoint, first_run["teacher"])
    torch.save(checkpoint, ckpt)
    kd, _, counter = _prune_and_distil(tmp_path / "resume", max_epochs=4, ckpt_path=ckpt)
    assert counter.steps == 4
    assert_state_equal(kd.teacher.state_dict(), first_run["teacher"])
    assert kd.teacher_file.parent == tmp_path / "resume" / "distillation"
    assert_state_equal(torch.load(kd.teacher_file, weights_only=True), first_run["teacher"])
    assert_no_teacher_tensor(
        torch.load(tmp_path / "resume" / "checkpoints" / "e3.ckpt", weights_only=True), first_run["teacher"]
    )


def test_a_pruned_checkpoint_without_a_teacher_record_fails_before_training(first_run, tmp_path):
    """Resumed past pruning from a run without distillation: the dense model is gone, so no silent no-op."""
    ckpt = tmp_path / "no_kd.ckpt"
    checkpoint = torch.load(first_run["pruned"], weights_only=True)
    del checkpoint["callbacks"]["KnowledgeDistillation"]
    torch.save(checkpoint, ckpt)
    counter = StepCounter()
    trainer = _trainer(
        [StructuredPruning(ratio=0.5, at_epoch=1), KnowledgeDistillation(), counter], tmp_path, max_epochs=3
    )
    with pytest.raises(ValueError, match=r"already pruned but records no teacher.*teacher=<checkpoint"):
        trainer.fit(_student(), datamodule=_digits(), ckpt_path=ckpt)
    assert counter.steps == 0 and not (tmp_path / "distillation").exists()
