"""Outlier smoothing: exact in float, found where it is exact and refused where it is not, and it gives back the
accuracy per-tensor INT8 loses to outlier channels, in the variants and in the exported files."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from pqv_lightning.pipeline import ExportConfig, QuantizationConfig, run_pipeline
from pqv_lightning.quantization import evaluate, find_couplings, quantize, smooth_outliers
from pqv_lightning.utils.checks import InvalidArgumentError


def add_value_outliers(model: nn.Module, channels: int = 2, scale: float = 200.0) -> nn.Module:
    """``channels`` value channels of every attention times ``scale``, the output projection's matching columns
    divided by it: the same function, with outlier channels at every ``proj`` input (as in
    ``benchmarks/quantization_recovery.py``)."""
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.proj.in_features
            picked = torch.arange(channels) * (dim // channels)
            block.attn.qkv.weight[2 * dim + picked] *= scale
            block.attn.qkv.bias[2 * dim + picked] *= scale
            block.attn.proj.weight[:, picked] /= scale
    return model


@pytest.fixture(scope="module")
def outlier_vit(trained_tiny_vit):
    return add_value_outliers(copy.deepcopy(trained_tiny_vit))


@pytest.fixture(scope="module")
def digits_split(digit_tensors):
    calibration = [digit_tensors["x_train"][i : i + 64] for i in range(0, 256, 64)]
    held_out = list(zip(digit_tensors["x_heldout"].split(135), digit_tensors["y_heldout"].split(135), strict=True))
    return calibration, held_out


def _agreement(reference: nn.Module, candidate: nn.Module, batches) -> float:
    with torch.no_grad():
        same = [(reference(x).argmax(1) == candidate(x).argmax(1)).float() for x, _ in batches]
    return float(torch.cat(same).mean())


def test_smoothing_keeps_the_function_and_leaves_the_input_alone(outlier_vit, digits_split):
    calibration, held_out = digits_split
    before = {k: v.clone() for k, v in outlier_vit.state_dict().items()}
    result = smooth_outliers(outlier_vit, calibration)
    assert all(torch.equal(before[k], v) for k, v in outlier_vit.state_dict().items())
    x = held_out[0][0]
    with torch.no_grad():
        reference, smoothed = outlier_vit(x), result.model(x)
    assert float((smoothed - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    kinds = sorted({c.coupling.kind for c in result.couplings})
    assert kinds == ["norm", "value"]
    # every block: norm1 -> qkv, norm2 -> fc1, qkv values -> proj; then fc_norm -> head (average pooling)
    found = {(c.coupling.producer, c.coupling.consumers) for c in result.couplings}
    for i in range(len(outlier_vit.blocks)):
        assert {(f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",)), (f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",)),
                (f"blocks.{i}.attn.qkv", (f"blocks.{i}.attn.proj",))} <= found  # fmt: skip
    assert ("fc_norm", ("head",)) in found and len(found) == 3 * len(outlier_vit.blocks) + 1
    values = [c for c in result.couplings if c.coupling.kind == "value"]
    assert all(c.alpha is not None and c.largest_ratio > 50 for c in values)
    assert all(c.error_after < c.error_before / 10 for c in values)
    assert {f"blocks.{i}.attn.proj" for i in range(len(outlier_vit.blocks))} <= set(result.smoothed_layers)
    json.dumps(result.as_dict())  # plain data for the manifest


@pytest.mark.parametrize("target", ["int8_pt2e:xnnpack", "int8_static:x86", "int8_dynamic:x86"])
def test_smoothing_gives_back_what_outliers_take_from_int8(outlier_vit, digits_split, target):
    calibration, held_out = digits_split
    float_top1 = evaluate(outlier_vit, held_out)["top1"]
    plain = quantize(outlier_vit, target, calibration[0][:1], calibration)
    smoothed = quantize(smooth_outliers(outlier_vit, calibration).model, target, calibration[0][:1], calibration)
    plain_top1, smoothed_top1 = evaluate(plain.module, held_out)["top1"], evaluate(smoothed.module, held_out)["top1"]
    assert plain_top1 < float_top1 - 5, (float_top1, plain_top1)  # the setting does cost accuracy
    assert smoothed_top1 >= float_top1 - 1.5, (float_top1, plain_top1, smoothed_top1)
    assert _agreement(outlier_vit, smoothed.module, held_out) >= 0.97


class _NormIntoLinearAndResidual(nn.Module):
    """A norm whose output feeds a linear layer *and* the residual stream: scaling it would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.head(y + self.fc(y))


class _GeluMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ReluMlp(_GeluMlp):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()


def test_couplings_are_kept_only_where_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    kept, refused = find_couplings(_NormIntoLinearAndResidual().eval(), x)
    assert kept == [] and [name for name, _ in refused] == ["norm -> fc"]
    assert "logits change" in refused[0][1]
    assert find_couplings(_GeluMlp().eval(), x) == ([], [])  # never proposed across GELU
    kept, refused = find_couplings(_ReluMlp().eval(), x)
    assert [(c.kind, c.producer, c.consumers) for c in kept] == [("mlp", "fc1", ("fc2",))] and refused == []


def test_bad_settings_are_refused_before_any_work(outlier_vit, digits_split):
    calibration, _ = digits_split
    with pytest.raises(InvalidArgumentError, match="alphas"):
        smooth_outliers(outlier_vit, calibration, alphas=(0.5, 1.0))
    with pytest.raises(ValueError, match="zero calibration batches"):
        smooth_outliers(outlier_vit, [])
    with pytest.raises(InvalidArgumentError, match="smoothing"):
        QuantizationConfig(targets=["int8_pt2e:xnnpack"], smoothing="yes")
    with pytest.raises(InvalidArgumentError, match="calibration_batches"):
        QuantizationConfig(targets=["int8_dynamic:x86"], calibration_batches=0, smoothing=True)


def test_the_chain_builds_variants_and_files_from_the_smoothed_model(outlier_vit, digits_split, tmp_path):
    calibration, held_out = digits_split
    train = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calibration]
    config = QuantizationConfig(targets=["int8_pt2e:xnnpack"], calibration_batches=4, smoothing=True)
    export = ExportConfig(artifacts={"onnx": ["int8_qdq"]}, output_dir=tmp_path, calibration_batches=4, batch_size=1)
    result = run_pipeline(outlier_vit, held_out[:1], train, quantization=config, export=export)
    assert result.smoothing is not None and result.smoothing.smoothed
    (variant,) = result.quantization
    assert variant.error is None and variant.top1_agreement >= 0.97
    (record,) = result.export.records
    assert record.status == "ok", record.reason
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["meta"]["smoothing"]["smoothed_layers"] == result.smoothing.smoothed_layers


@pytest.mark.slow  # two fit-end chains with a sensitivity analysis each (~2 min)
def test_integer_first_takes_the_cheapest_recipe_that_keeps_every_layer_integer(
    outlier_vit, trained_tiny_vit, digits_split
):
    calibration, held_out = digits_split
    train = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calibration]
    config = QuantizationConfig(
        targets=["int8_pt2e:xnnpack"], calibration_batches=4, max_drop=1.0, integer_first=True,
        sensitivity=["int8_pt2e:xnnpack"], granularity="block",
    )  # fmt: skip
    result = run_pipeline(outlier_vit, held_out[:2], train, quantization=config)
    assert result.recipe == "smoothing" and result.smoothing is not None
    (variant,) = result.quantization
    assert variant.error is None and variant.float_layers == []
    assert 100 * (result.float_metrics["top1"] - variant.top1) <= 1.0
    rankings = {a.model: a.ranking() for a in result.sensitivity}
    assert set(rankings) == {"", "before smoothing"}  # the ranking after smoothing and the one before
    assert rankings[""] != rankings["before smoothing"]
    plain = run_pipeline(trained_tiny_vit, held_out[:2], train, quantization=replace(config, sensitivity=()))
    assert plain.recipe == "plain" and plain.smoothing is None and plain.rounding == ("nearest", False)
    with pytest.raises(InvalidArgumentError, match="integer_first"):
        QuantizationConfig(targets=["int8_pt2e:xnnpack"], integer_first=True)
    with pytest.raises(InvalidArgumentError, match="integer_first"):
        QuantizationConfig(targets=["int8_pt2e:xnnpack"], max_drop=1.0, integer_first=True, smoothing=True)
