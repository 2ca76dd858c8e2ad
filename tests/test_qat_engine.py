"""The QAT engine without Lightning: prepare -> train -> checkpoint -> convert, for INT8 PT2E and INT4 weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pqv_lightning.export import prepare_for_xnnpack
from pqv_lightning.quantization import (
    check_qat_target,
    convert_qat,
    export_for_pt2e,
    float_weights,
    prepare_qat,
    quantization_state,
    quantize,
    set_observers,
    top1_agreement,
)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 4) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for step in range(steps):
        index = slice(64 * step, 64 * (step + 1))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def int8(trained_tiny_vit, digit_tensors):
    x, y = digit_tensors["x_train"], digit_tensors["y_train"]
    prepared = prepare_qat(prepare_for_xnnpack(trained_tiny_vit), "int8_pt2e:xnnpack", x[:4])
    _train(prepared, x, y)
    return prepared


def test_int8_qat_trains_checkpoints_and_converts(int8, trained_tiny_vit, digit_tensors):
    x = digit_tensors["x_heldout"]
    assert isinstance(int8, torch.fx.GraphModule)
    assert "dropout" not in int8.code  # the train/eval switch cannot turn a dropout into p=0.5 (see export_for_pt2e)
    state = quantization_state(int8)
    assert any(k.endswith("activation_post_process.min_val") for k in state)
    assert set_observers(int8, False) == len({k.rsplit(".", 2)[0] for k in state if k.endswith("observer_enabled")})
    int8.eval()
    with torch.no_grad():
        before = int8(x)
        int8.train()
        int8.eval()  # switching back and forth leaves the function as it was
        assert torch.equal(int8(x), before)
    # the state dict is plain tensors and rebuilds the same model in a fresh prepare (what resume does)
    fresh = prepare_qat(prepare_for_xnnpack(trained_tiny_vit), "int8_pt2e:xnnpack", torch.zeros(4, 1, 16, 16))
    fresh.load_state_dict(int8.state_dict())
    set_observers(fresh, False)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), before)
    converted = convert_qat(int8, "int8_pt2e:xnnpack")
    assert converted.origin == "qat" and converted.name == "qat_int8_pt2e_xnnpack"
    assert "quantize_per_tensor" in converted.module.code and "dequantize_per_channel" in converted.module.code
    assert top1_agreement(int8, converted.module, [x]) >= 0.97  # the converted model computes what was trained
    trained = float_weights(int8, trained_tiny_vit)
    assert type(trained) is type(trained_tiny_vit) and trained.patch_embed.proj.weight.shape == (64, 1, 4, 4)
    assert not torch.equal(trained.blocks[0].mlp.fc1.weight, trained_tiny_vit.blocks[0].mlp.fc1.weight)


def test_int4_qat_converts_to_the_ptq_form_of_its_trained_weights(trained_tiny_vit, digit_tensors):
    x, y = digit_tensors["x_train"], digit_tensors["y_train"]
    prepared = prepare_qat(trained_tiny_vit, "int4_weight", x[:4], float_layers=["head"])
    assert type(prepared.blocks[0].mlp.fc1).__name__ == "FakeQuantizedLinear" and type(prepared.head) is nn.Linear
    _train(prepared, x, y)
    converted = convert_qat(prepared, "int4_weight", ["head"])
    trained = float_weights(prepared, trained_tiny_vit)
    ptq = quantize(trained, "int4_weight", x[:1], float_layers=["head"])
    held = digit_tensors["x_heldout"]
    with torch.no_grad():
        torch.testing.assert_close(converted.module(held), ptq.module(held))
    assert converted.float_layers == ["head"] and quantization_state(prepared) == {}


def test_refusals(trained_tiny_vit):
    with pytest.raises(ValueError, match=r"target='int8_static:x86' is invalid; accepted: a target quantization-aware"):
        check_qat_target("int8_static:x86")
    example = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"float_layers=\['\*'\] is invalid; accepted: patterns that leave"):
        prepare_qat(trained_tiny_vit, "int4_weight", example, float_layers=["*"])
    with_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    with pytest.raises(ValueError, match=r"model='Sequential' is invalid; accepted: a model without batch norm"):
        prepare_qat(with_bn, "int8_pt2e:xnnpack", example)
    with pytest.raises(ValueError, match=r"prepared=.VisionTransformer. is invalid; accepted: a model from prepare_"):
        convert_qat(trained_tiny_vit, "int4_weight")


def test_export_for_pt2e_has_no_dropout_and_keeps_the_function(trained_tiny_vit, digit_tensors):
    graph = export_for_pt2e(trained_tiny_vit, digit_tensors["x_train"][:1])
    assert "dropout" not in graph.code
    x = digit_tensors["x_heldout"][:64]
    with torch.no_grad():
        torch.testing.assert_close(graph(x), trained_tiny_vit(x))
