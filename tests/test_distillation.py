"""KnowledgeDistillation: loss terms, teacher capture (any callback order), isolation, opt-in, bad input."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.distillation import distill, distillation_term, load_teacher

torch.set_num_threads(1)


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
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
def test_teacher_is_the_dense_model_before_pruning_in_any_order(tiny_classifier, digits, kd_first):
    dense_state = copy.deepcopy(tiny_classifier.model.state_dict())
    kd, sp = KnowledgeDistillation(), StructuredPruning(ratio=0.5)
    held: dict = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            held["optimizer"] = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}

    trainer = _trainer([kd, sp, Probe()] if kd_first else [sp, kd, Probe()])
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
    assert "train/distill_term" in trainer.callback_metrics


def test_without_pruning_the_teacher_is_the_model_at_setup_and_changes_the_loss(tiny_classifier, digits):
    kd = KnowledgeDistillation(mode="hard", alpha=1.0)
    initial = copy.deepcopy(tiny_classifier.model)
    _trainer([kd]).fit(tiny_classifier, datamodule=digits)
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


def test_a_module_that_has_not_opted_in_fails_at_setup(digits):
    module = _Foreign(call_distill=True)
    with pytest.raises(TypeError, match="supports_distillation = True"):
        _trainer([KnowledgeDistillation()]).fit(module, datamodule=digits)
    assert module.steps == 0


def test_a_foreign_module_opts_in_with_two_lines(digits):
    class OptedIn(_Foreign):
        supports_distillation = True

    module = OptedIn(call_distill=True)
    kd = KnowledgeDistillation()
    _trainer([kd]).fit(module, datamodule=digits)
    assert module.steps == 2 and "train/distill_term" in _trainer_metrics(kd)

    forgot = OptedIn(call_distill=False)
    with pytest.raises(RuntimeError, match="did not call"):
        _trainer([KnowledgeDistillation()]).fit(forgot, datamodule=digits)


def _trainer_metrics(kd: KnowledgeDistillation) -> dict:
    return {"train/distill_term": kd.distiller.last_term} if kd.distiller.last_term is not None else {}


def test_teacher_from_checkpoint_and_state_dict_files(tmp_path, tiny_vit_kwargs, digits):
    teacher_module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)
    trainer = _trainer([])
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
    _trainer([kd]).fit(student, datamodule=digits)
    torch.testing.assert_close(kd.teacher(images), teacher_module(images))


def test_teacher_with_other_classes_is_rejected_at_setup(tmp_path, tiny_vit_kwargs, digits):
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **tiny_vit_kwargs)
    weights = tmp_path / "five.pth"
    torch.save(other.state_dict(), weights)
    kd = KnowledgeDistillation(
        teacher=str(weights), teacher_kwargs={"model_name": "vit_tiny_patch16_224", "num_classes": 5, **tiny_vit_kwargs}
    )
    student = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)
    with pytest.raises(ValueError, match="teacher predicts 5 classes but the student 10"):
        _trainer([kd]).fit(student, datamodule=digits)


def test_resume_distils_from_the_original_teacher(tmp_path, tiny_vit_kwargs, digits):
    def make():
        return ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=tiny_vit_kwargs)

    first = make()
    kd = KnowledgeDistillation()
    sp = StructuredPruning(ratio=0.5, at_epoch=1)
    trainer = _trainer([sp, kd], max_epochs=2)
    trainer.fit(first, datamodule=digits)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    teacher_state = copy.deepcopy(kd.teacher.state_dict())

    kd2 = KnowledgeDistillation()
    _trainer([StructuredPruning(ratio=0.5, at_epoch=1), kd2], max_epochs=3).fit(
        make(), datamodule=digits, ckpt_path=ckpt
    )
    for key, value in kd2.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key])
