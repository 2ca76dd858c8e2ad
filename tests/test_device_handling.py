"""Device and dtype handling of the callbacks and engines, checked on the CPU (issue 25, item 1).

What a callback creates or feeds the model (example inputs, calibration batches, gates, the teacher) must follow the
module's device and dtype, and what QAT trains must not be pinned to the device or dtype it was exported with. A
module in a dtype other than the loader's float32 (``precision="64-true"`` / ``"bf16-true"``) or under bf16 autocast
shows on the CPU the same mistakes a GPU would: each test here failed before its fix. ``tests/test_cuda.py`` runs the
callbacks on a real CUDA device.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import timm
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning.callbacks import (
    KnowledgeDistillation,
    QuantizationAwareTraining,
    SparsityGates,
    StructuredPruning,
)
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.distillation import Distiller, frozen_copy
from pqv_lightning.pruning import PruningSpec, prune
from pqv_lightning.pruning.gates import attach_gates
from pqv_lightning.pruning.importances import IMPORTANCES
from pqv_lightning.quantization import convert_qat, prepare_qat

torch.set_num_threads(1)


def _tiny(tiny_vit_kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs).eval()


def _batches(count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_prune_takes_float32_batches_to_a_float64_model(tiny_vit_kwargs, importance) -> None:
    """A loader's float32 example and calibration batches reach a float64 model in its dtype, for every criterion."""
    model = _tiny(tiny_vit_kwargs).double()
    batches = _batches()
    result = prune(model, PruningSpec(ratio=0.25, importance=importance, calibration_batches=2), batches[0][0],
                   calibration=batches)  # fmt: skip
    assert result.params_after < result.params_before
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(batches[0][0].double()).dtype == torch.float64


def test_gates_take_the_dtype_of_the_layer_they_gate(tiny_vit_kwargs) -> None:
    model = _tiny(tiny_vit_kwargs).to(torch.bfloat16)
    x = torch.randn(2, 1, 16, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
    gates = attach_gates(model)
    assert {g.dtype for g in gates.values()} == {torch.bfloat16}
    with torch.no_grad():
        after = model(x)  # a float32 gate made the features float32 and the next bf16 layer refuse them
    assert after.dtype == torch.bfloat16 and torch.equal(after, before)  # gates at 1: the same function


def test_the_teacher_follows_the_images_to_their_dtype(tiny_vit_kwargs) -> None:
    teacher = frozen_copy(_tiny(tiny_vit_kwargs))
    distiller = Distiller(teacher)
    images = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    logits = distiller.teacher_logits(images)
    assert logits.dtype == torch.float64 and {p.dtype for p in teacher.parameters()} == {torch.float64}
    distiller.to("cpu", torch.bfloat16)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def _fit(callbacks: list, precision: str, tmp_path) -> tuple[pl.Trainer, ViTClassifier]:
    torch.manual_seed(0)
    module = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs={"img_size": 16, "patch_size": 4, "in_chans": 1,
                           "depth": 2, "embed_dim": 64, "num_heads": 4}, warmup_epochs=0)  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", precision=precision, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(img_size=16, in_chans=1, batch_size=16, augment=False))
    return trainer, module


CONVERTED = {"64-true": torch.float64, "bf16-true": torch.bfloat16}


@pytest.mark.parametrize(
    ("precision", "make"),
    [
        ("64-true", lambda: [StructuredPruning(0.25, "taylor", calibration_batches=2, at_epoch=1)]),
        ("bf16-true", lambda: [StructuredPruning(0.25, "obdc", calibration_batches=2, at_epoch=1)]),
        ("64-true", lambda: [SparsityGates(0.25, prune_epoch=1)]),
        ("bf16-true", lambda: [StructuredPruning(0.25, at_epoch=0), KnowledgeDistillation()]),
        ("64-true", lambda: [StructuredPruning(0.25, at_epoch=1), KnowledgeDistillation()]),
    ],
    ids=["taylor_at_epoch_1", "obdc_at_epoch_1", "gates", "teacher_from_setup", "teacher_from_epoch_1"],
)
def test_callbacks_under_a_precision_that_converts_the_module(tmp_path, precision, make) -> None:
    """The module is float64 / bf16 once the fit starts, the loader's batches float32: pruning mid-fit (its example
    and calibration batches), gates and the teacher (captured in setup in float32, or mid-fit) must follow it."""
    callbacks = make()
    _, module = _fit(callbacks, precision, tmp_path)
    assert current_structure(module.model) is not None
    assert {p.dtype for p in module.parameters()} == {CONVERTED[precision]}
    kd = [cb for cb in callbacks if isinstance(cb, KnowledgeDistillation)]
    if kd:
        assert {p.dtype for p in kd[0].teacher.parameters()} == {CONVERTED[precision]}
        assert kd[0].distiller.last_term is not None and bool(kd[0].distiller.last_term.isfinite())


def test_the_qat_graph_pins_no_device_and_trains_under_bf16_autocast(tiny_vit_kwargs) -> None:
    """``torch.export`` records a ``.float()`` that was a no-op as an assertion of the export's device and dtype (a
    graph exported on a GPU then refused CPU tensors at conversion), and the fused observer kernel refuses bf16."""
    from pqv_lightning.export import prepare_for_xnnpack

    model = _tiny(tiny_vit_kwargs)
    prepared = prepare_qat(prepare_for_xnnpack(model), "int8_pt2e:xnnpack", torch.zeros(2, 1, 16, 16))
    pinned = [n.format_node() for n in prepared.graph.nodes if "device" in n.kwargs]
    assert not pinned, pinned
    x = torch.randn(4, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prepared(x)
    logits.float().sum().backward()
    assert prepared.get_parameter("blocks.0.attn.qkv.weight").grad is not None
    with torch.no_grad():
        converted = convert_qat(copy.deepcopy(prepared), "int8_pt2e:xnnpack").module(x)
    assert converted.shape == (4, 10) and bool(converted.isfinite().all())


def test_quantization_aware_training_under_bf16_mixed(tmp_path) -> None:
    qat = QuantizationAwareTraining("int8_pt2e:xnnpack", start_epoch=1)
    trainer, _ = _fit([qat], "bf16-mixed", tmp_path)
    assert qat.active and qat.result is not None
    assert trainer.global_step == 4
    with torch.no_grad():
        logits = qat.result.variant.module(torch.randn(2, 1, 16, 16))
    assert logits.shape == (2, 10) and bool(logits.isfinite().all())


def test_qat_refuses_a_precision_that_converts_its_inputs_before_training(tmp_path) -> None:
    # bf16-true fed the float32 fake-quantized model bf16 batches: "mat1 and mat2 must have the same dtype" at epoch 1
    qat = QuantizationAwareTraining("int4_weight:xnnpack", start_epoch=1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", precision="bf16-true", logger=False, callbacks=[qat],
                         default_root_dir=tmp_path)  # fmt: skip
    module = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs={"img_size": 16, "patch_size": 4, "in_chans": 1,
                           "depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    with pytest.raises(ValueError, match=r"precision='bf16-true' is invalid; accepted: 32-true, 16-mixed or bf16-mix"):
        trainer.fit(module, DigitsDataModule(img_size=16, in_chans=1, batch_size=16))
    assert trainer.global_step == 0


def test_a_cpu_float_copy_leaves_gradients_behind_and_keeps_tied_weights() -> None:
    from pqv_lightning.utils.modules import cpu_float_copy

    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    model[1].weight = torch.nn.Parameter(torch.randn(5, 4))
    model[0].weight = model[1].weight  # tied
    model = model.to(torch.bfloat16)
    model(torch.tensor([1, 2])).float().sum().backward()
    copied = cpu_float_copy(model)
    assert not copied.training and all(p.grad is None for p in copied.parameters())
    assert all(p.dtype == torch.float32 for p in copied.parameters())
    assert copied[2].num_batches_tracked.dtype == torch.long  # an integer buffer keeps its dtype
    assert copied[0].weight is copied[1].weight  # still tied
    assert model[1].weight.dtype == torch.bfloat16 and model[1].weight.grad is not None  # the original untouched
    assert torch.equal(copied[1].weight, model[1].weight.float())
