"""GPTQ weight rounding and bias correction: on the grid each runtime derives itself, and better than nearest."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from pqv_lightning.quantization import GRIDS, evaluate, grid_for, quantize, round_weights
from pqv_lightning.quantization.targets import QuantizationTarget, supported_targets
from pqv_lightning.utils.checks import InvalidArgumentError


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x.flatten(1))))


def _runtime_weights(variant) -> dict[tuple[int, ...], torch.Tensor]:
    """The dequantized weights the variant's runtime holds, by shape (torch.ao modules, torchao tensors, PT2E
    graph constants)."""
    module = variant.unwrapped()
    found = {}
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
                weight, scale, zero = (getattr(module, a.target) for a in node.args[:3])
                found[tuple(weight.shape)] = (weight.float() - zero[:, None].float()) * scale[:, None]
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if callable(weight):  # torch.ao quantized Linear
            weight = weight()
        if isinstance(weight, torch.Tensor) and (
            weight.is_quantized or type(weight) not in (torch.Tensor, nn.Parameter)
        ):
            found[tuple(weight.shape)] = weight.dequantize()
    return found


@pytest.mark.parametrize("target", sorted(GRIDS))
def test_each_grid_is_the_one_its_runtime_derives(target):
    """The runtime, handed the rounded float weights, stores exactly the integers GPTQ chose (the anchors at the
    value the runtime rounds them to): nothing is re-rounded."""
    if target not in {str(t) for t in supported_targets()}:
        pytest.skip(f"{target} cannot be built here")
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    calibration = [torch.randn(32, 1, 8, 8) for _ in range(2)]
    rounded = round_weights(model, target, calibration, bias_correction=False)
    held = _runtime_weights(quantize(rounded.model, target, calibration[0][:1], calibration))
    grid = grid_for(target)
    for name in ("a", "b"):
        stored = rounded.model.get_submodule(name).weight.detach().double()
        width = stored.shape[1]
        group = grid.groups(width) or stored.numel()
        blocks = stored.reshape(-1, group) if grid.groups(width) else stored.reshape(1, -1)
        scale = blocks.abs().amax(1, keepdim=True) / grid.divisor
        anchors = blocks.abs() == blocks.abs().amax(1, keepdim=True)
        levels = torch.where(blocks < 0, float(grid.anchors[0]), float(grid.anchors[1])).double()
        integers = torch.where(anchors, levels, torch.round(blocks / scale))
        off_anchor = ~anchors
        assert torch.allclose((blocks / scale)[off_anchor], integers[off_anchor], rtol=0, atol=1e-4)  # on the grid
        expected = (integers * scale).reshape(stored.shape)
        runtime = held[tuple(stored.shape)].double()
        exact = torch.where(anchors, levels == levels.round(), True).reshape(stored.shape)  # a tie left: half a step
        tolerance = torch.where(
            exact,
            1e-6 * float(stored.abs().max()),
            0.5 * scale.expand_as(blocks).reshape(stored.shape) + 1e-6 * float(stored.abs().max()),
        )
        assert ((runtime - expected).abs() <= tolerance).all(), (target, name)


def test_gptq_lowers_the_output_error_of_every_layer(trained_tiny_vit, digit_tensors):
    calibration = [digit_tensors["x_train"][i : i + 64] for i in range(0, 256, 64)]
    for target in ("int8_pt2e:xnnpack", "int4_weight"):
        rounded = round_weights(trained_tiny_vit, target, calibration)
        assert rounded.errors and all(after < before for before, after in rounded.errors.values()), target
        nearest = round_weights(trained_tiny_vit, target, calibration, rounding="nearest", bias_correction=False)
        assert all(after == pytest.approx(before) for before, after in nearest.errors.values())


def test_gptq_int4_comes_closer_to_float_on_held_out_digits(trained_tiny_vit, digit_tensors):
    calibration = [digit_tensors["x_train"][i : i + 64] for i in range(0, 512, 64)]
    held_out = list(zip(digit_tensors["x_heldout"].split(135), digit_tensors["y_heldout"].split(135), strict=True))
    x = digit_tensors["x_heldout"]
    with torch.no_grad():
        reference = trained_tiny_vit(x)

    def logit_error(variant) -> float:
        with torch.no_grad():
            return float((variant.module(x) - reference).norm() / reference.norm())

    nearest = quantize(trained_tiny_vit, "int4_weight", x[:1])
    gptq = quantize(trained_tiny_vit, "int4_weight", x[:1], calibration, rounding="gptq", bias_correction=True)
    assert "gptq + bias correction" in gptq.info["rounding"]
    assert logit_error(gptq) < 0.8 * logit_error(nearest), (logit_error(gptq), logit_error(nearest))
    float_top1 = evaluate(trained_tiny_vit, held_out)["top1"]
    assert evaluate(gptq.module, held_out)["top1"] >= float_top1 - 1.0


def test_the_input_model_is_left_alone_and_bad_settings_are_refused(trained_tiny_vit, digit_tensors):
    calibration = [digit_tensors["x_train"][:64]]
    before = copy.deepcopy(trained_tiny_vit.state_dict())
    round_weights(trained_tiny_vit, "int8_pt2e:xnnpack", calibration)
    assert all(torch.equal(before[k], v) for k, v in trained_tiny_vit.state_dict().items())
    with pytest.raises(InvalidArgumentError, match="integer weights"):
        round_weights(trained_tiny_vit, "fp16", calibration)
    with pytest.raises(InvalidArgumentError, match="rounding"):
        round_weights(trained_tiny_vit, "int4_weight", calibration, rounding="adaround")
    with pytest.raises(ValueError, match="zero calibration batches"):
        round_weights(trained_tiny_vit, "int4_weight", [])
    with pytest.raises(ValueError, match="gptq rounding"):
        quantize(trained_tiny_vit, "int4_weight", calibration[0][:1], rounding="gptq")
    assert QuantizationTarget.parse("int4_weight").backend == "xnnpack"


def test_the_chain_rounds_the_variants_and_the_files_of_their_grid(trained_tiny_vit, digit_tensors, tmp_path):
    from pqv_lightning.pipeline import ExportConfig, QuantizationConfig, run_pipeline

    train = [(digit_tensors["x_train"][i : i + 64], digit_tensors["y_train"][i : i + 64]) for i in range(0, 256, 64)]
    val = list(zip(digit_tensors["x_heldout"].split(270), digit_tensors["y_heldout"].split(270), strict=True))[:1]
    quantization = QuantizationConfig(
        targets=["int4_weight", "fp16"], calibration_batches=4, rounding="gptq", bias_correction=True
    )
    export = ExportConfig(artifacts={"executorch": ["int4"]}, output_dir=tmp_path, calibration_batches=4, batch_size=1)
    result = run_pipeline(trained_tiny_vit, val, train, quantization=quantization, export=export)
    int4, fp16 = result.quantization
    assert "gptq + bias correction" in int4.quantized.info["rounding"] and "rounding" not in fp16.quantized.info
    (record,) = result.export.records
    assert record.status == "ok", record.reason
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "gptq + bias correction" in manifest["meta"]["rounding"]["executorch-int4"]
