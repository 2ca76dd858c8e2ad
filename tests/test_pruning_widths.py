"""round_to="auto": kept widths rounded to the multiple the target kernels run fastest."""

from __future__ import annotations

import pytest
import timm
import torch

from pqv_lightning.callbacks import StructuredPruning
from pqv_lightning.export.widths import KERNEL_MULTIPLE, KERNEL_OF, kernel_multiple, resolve_round_to
from pqv_lightning.latency_search import LATENCY_ARTIFACTS
from pqv_lightning.pruning import PruningSpec, prune


def test_every_latency_target_has_a_kernel_multiple() -> None:
    for artifact in LATENCY_ARTIFACTS:
        assert kernel_multiple(artifact) == KERNEL_MULTIPLE[KERNEL_OF[artifact.split("-")[0]]]
    assert kernel_multiple("executorch-int8_dynamic") == KERNEL_MULTIPLE["xnnpack"]
    assert kernel_multiple("aoti-int8") == KERNEL_MULTIPLE["onednn"]
    with pytest.raises(ValueError, match=r"latency_target.*'tflite-int8'.*executorch, onnx, aoti"):
        kernel_multiple("tflite-int8")


@pytest.mark.parametrize(("given", "expected"), [("auto", KERNEL_MULTIPLE["onnxruntime"]), (8, 8), (None, None)])
def test_resolve_round_to(given, expected) -> None:
    assert resolve_round_to(given, "onnx-int8") == expected


def test_the_callback_resolves_auto_for_its_latency_target_and_refuses_other_words() -> None:
    callback = StructuredPruning(ratio=0.3, round_to="auto", latency_target="executorch-int8_dynamic")
    assert callback.spec.round_to == KERNEL_MULTIPLE["xnnpack"]
    assert StructuredPruning(ratio=0.3, round_to=4).spec.round_to == 4
    with pytest.raises(ValueError, match=r"round_to='fast'.*None, a positive int or 'auto'"):
        StructuredPruning(ratio=0.3, round_to="fast")


def test_auto_rounded_pruning_keeps_multiples_of_the_kernel_tile() -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=3,
        mlp_ratio=4, num_classes=10,
    )  # fmt: skip
    x = torch.randn(1, 3, 32, 32)
    multiple = resolve_round_to("auto", "onnx-int8")
    prune(model, PruningSpec(ratio=0.3, bottleneck=True, round_to=multiple), x)
    hidden = [block.mlp.fc1.out_features for block in model.blocks]
    assert all(width % multiple == 0 and width < 384 for width in hidden), hidden
