"""Mixed precision and sensitivity: float layers honoured by every quantization path, the per-layer sensitivity
ranking, the float budget, and the bad inputs, on the session's tiny ViT trained on digits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pqv_lightning.quantization import (
    BudgetNotMetError,
    LogitReference,
    MixedPrecision,
    analyze_sensitivity,
    block_of,
    logit_metrics,
    plan_float_layers,
    quantizable_layers,
    quantize,
    resolve_float_layers,
    units,
)

LAYERS = [
    "blocks.0.attn.qkv",
    "blocks.0.attn.proj",
    "blocks.0.mlp.fc1",
    "blocks.0.mlp.fc2",
    "blocks.1.attn.qkv",
    "blocks.1.attn.proj",
    "blocks.1.mlp.fc1",
    "blocks.1.mlp.fc2",
    "head",
]


@pytest.fixture(scope="module")
def heldout(digit_tensors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(digit_tensors["x_heldout"].split(180), digit_tensors["y_heldout"].split(180), strict=True))


@pytest.fixture(scope="module")
def calibration(digit_tensors) -> list[torch.Tensor]:
    return list(digit_tensors["x_train"][:128].split(64))


def test_layers_blocks_and_patterns(trained_tiny_vit):
    assert quantizable_layers(trained_tiny_vit, "int8_dynamic") == LAYERS
    assert quantizable_layers(trained_tiny_vit, "int8_pt2e") == ["patch_embed.proj", *LAYERS]
    assert quantizable_layers(trained_tiny_vit, "fp16") == []
    assert block_of("blocks.1.mlp.fc2") == "blocks.1" and block_of("head") == "head"
    assert units(LAYERS, "block") == {"blocks.0": LAYERS[:4], "blocks.1": LAYERS[4:8], "head": ["head"]}

    def resolve(patterns: list[str]) -> tuple[str, ...]:
        return resolve_float_layers(trained_tiny_vit, patterns, "int8_dynamic")

    assert resolve(["head"]) == ("head",)
    assert resolve(["blocks.*.mlp.fc2", "head"]) == ("blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "head")
    assert resolve(["blocks.1"]) == tuple(LAYERS[4:8])  # a block keeps all its layers
    assert resolve(["blocks.0.attn"]) == ("blocks.0.attn.qkv", "blocks.0.attn.proj")  # any container


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (["blocks.0.mlp.fc3"], r"float_layers\[0\]='blocks.0.mlp.fc3' is invalid; .*close to it: .*blocks.0.mlp.fc1"),
        (["head", "blok.1"], r"float_layers\[1\]='blok.1' is invalid; .*close to it: .*blocks.1"),
        (["norm"], r"float_layers\[0\]='norm' is invalid; accepted: a layer or block that int8_dynamic quantizes"),
        ([""], r"float_layers\[0\]='' is invalid"),
    ],
)
def test_a_float_layer_that_matches_nothing_names_close_ones(trained_tiny_vit, patterns, message):
    with pytest.raises(ValueError, match=message):
        resolve_float_layers(trained_tiny_vit, patterns, "int8_dynamic")
    with pytest.raises(ValueError, match=message.replace("int8_dynamic", "int8_pt2e")):
        quantize(trained_tiny_vit, "int8_pt2e", torch.zeros(1, 1, 16, 16), [torch.zeros(1, 1, 16, 16)],
                 float_layers=patterns)  # fmt: skip


def test_float_layers_refused_where_they_cannot_apply(trained_tiny_vit):
    example = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"float_layers=\['head'\] is invalid; accepted: an empty list for fp16"):
        quantize(trained_tiny_vit, "fp16", example, float_layers=["head"])
    with pytest.raises(ValueError, match=r"float_layers=\['\*'\] is invalid; accepted: patterns that leave"):
        quantize(trained_tiny_vit, "int8_dynamic", example, float_layers=["*"])


def _weight_is_float(graph: torch.fx.GraphModule) -> dict[str, bool]:
    """For each linear node of a PT2E graph, by module: whether its weight enters as a float tensor (no dequantize)."""
    found = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            module = [path for path, _ in node.meta["nn_module_stack"].values()][-1]
            found[module] = "dequantize" not in str(getattr(node.args[1], "target", ""))
    return found


@pytest.mark.parametrize("spec", ["int8_dynamic:x86", "int8_static:x86", "int8_pt2e:xnnpack", "int8_pt2e:x86",
                                  "int4_weight"])  # fmt: skip
def test_every_path_keeps_the_float_layers_in_float(spec, trained_tiny_vit, heldout, calibration):
    keep = ["blocks.1.mlp", "head"]
    full = quantize(trained_tiny_vit, spec, heldout[0][0][:1], calibration)
    mixed = quantize(trained_tiny_vit, spec, heldout[0][0][:1], calibration, float_layers=keep)
    float_names = ("blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head")
    assert mixed.float_layers == list(float_names) and full.float_layers == []
    module = mixed.unwrapped()
    if isinstance(module, torch.fx.GraphModule) and spec.startswith("int8_pt2e"):
        weights = _weight_is_float(module)
        assert {name for name, is_float in weights.items() if is_float} == set(float_names)
        assert not any(_weight_is_float(full.module).values())
    else:
        named = dict(module.named_modules())
        for name in LAYERS:
            kept = type(named[name]) is nn.Linear and type(named[name].weight) is nn.Parameter
            assert kept == (name in float_names), (name, type(named[name]), type(getattr(named[name], "weight", None)))
    # the float layers are really float: the variant is closer to the float model than the fully quantized one
    reference = LogitReference.of(trained_tiny_vit, heldout)
    assert logit_metrics(mixed.module, reference)["sqnr_db"] > logit_metrics(full.module, reference)["sqnr_db"]


def test_sensitivity_ranks_every_layer_both_ways(trained_tiny_vit, heldout):
    analysis = analyze_sensitivity(trained_tiny_vit, "int4_weight", heldout)
    assert sorted(analysis.ranking()) == sorted(LAYERS)
    assert analysis.images == 540 and 0.7 < analysis.float_top1 <= 1.0
    quantized_kl = analysis.quantized["kl"]
    recoveries = [u.recovery(quantized_kl) for u in analysis.units]
    assert recoveries == sorted(recoveries, reverse=True)  # most sensitive first
    for unit in analysis.units:
        assert unit.error is None
        for metrics in (unit.quantized_alone, unit.float_alone):
            assert set(metrics) == {"top1", "agreement", "kl", "sqnr_db"}
            assert 0 <= metrics["top1"] <= 1 and 0 <= metrics["agreement"] <= 1 and metrics["kl"] >= 0
        # one layer quantized alone is closer to float than everything quantized
        assert unit.quantized_alone["sqnr_db"] > analysis.quantized["sqnr_db"]
    # the ranking is the measured one: keeping the top unit in float recovers at least as much as the last
    assert analysis.units[0].float_alone["kl"] <= analysis.units[-1].float_alone["kl"]
    assert analysis.as_dict()["units"][0]["unit"] == analysis.ranking()[0]


def test_sensitivity_per_block_for_pt2e(trained_tiny_vit, heldout, calibration):
    analysis = analyze_sensitivity(trained_tiny_vit, "int8_pt2e:xnnpack", heldout[:1], calibration, "block",
                                   modes=["float_alone"])  # fmt: skip
    assert sorted(analysis.ranking()) == ["blocks.0", "blocks.1", "head", "patch_embed.proj"]
    assert analysis.layers_of("blocks.0") == LAYERS[:4]
    assert all(u.quantized_alone == {} and "kl" in u.float_alone for u in analysis.units)


def test_budget_of_float_layers(trained_tiny_vit, heldout):
    reference = LogitReference.of(trained_tiny_vit, heldout)
    analysis = analyze_sensitivity(trained_tiny_vit, "int4_weight", reference)
    top = analysis.ranking()
    plan = plan_float_layers(trained_tiny_vit, "int4_weight", MixedPrecision(max_float_layers=2), reference,
                             sensitivity=analysis)  # fmt: skip
    assert plan.float_units == top[:2] and set(plan.float_layers) == set(top[:2])
    assert [step["units"] for step in plan.steps] == [top[:2]]
    # a drop budget takes the fewest units, most sensitive first, and measures each candidate
    full_drop = 100 * (reference.top1 - analysis.quantized["top1"])
    generous = plan_float_layers(trained_tiny_vit, "int4_weight", MixedPrecision(max_drop=full_drop + 1), reference,
                                 sensitivity=analysis)  # fmt: skip
    assert generous.float_layers == () and generous.steps[0]["units"] == []
    named = plan_float_layers(trained_tiny_vit, "int4_weight", MixedPrecision(float_layers=("head",), max_drop=0.0),
                              reference, sensitivity=analysis)  # fmt: skip
    assert "head" in named.float_layers and named.drop <= 0.0
    assert [len(step["units"]) for step in named.steps] == list(range(len(named.steps)))


def test_a_drop_budget_that_cannot_be_met_names_the_best_reached(trained_tiny_vit):
    """Labels = the float model's own predictions on noise images (near-tied logits): the float model scores
    100%, so every image INT4 with one float layer flips is a drop, and max_drop=0 cannot be met."""
    images = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = trained_tiny_vit.eval()(images).argmax(-1)
    reference = LogitReference.of(trained_tiny_vit, [(images, labels)])
    assert reference.top1 == 1.0
    with pytest.raises(
        BudgetNotMetError,
        match=r"max_drop=0.0 is invalid; accepted: a drop int4_weight:xnnpack can "
        r"reach on this model with max_float_layers=1 in float: the best was [0-9.]+ points with "
        r"[01] layer\(s\) in float .*use max_drop >= [0-9.]+ \(or allow more float layers\)\.$",
    ):
        plan_float_layers(trained_tiny_vit, "int4_weight", MixedPrecision(max_float_layers=1, max_drop=0.0), reference)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_float_layers": 0}, r"max_float_layers=0 is invalid; accepted: None or an int >= 1"),
        ({"max_drop": -1}, r"max_drop=-1 is invalid; accepted: None or a number in \[0, 100\]"),
        ({"granularity": "head"}, r"granularity='head' is invalid; accepted: layer, block"),
        ({"float_layers": ("",)}, r"float_layers\[0\]='' is invalid"),
    ],
)
def test_bad_mixed_precision_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixedPrecision(**kwargs)


def test_a_budget_larger_than_the_model_is_refused_before_any_work(trained_tiny_vit, heldout):
    spec = MixedPrecision(max_float_layers=3, granularity="block")
    with pytest.raises(ValueError, match=r"max_float_layers=3 is invalid; accepted: an int in \[1, 2\]: .* 3 blocks"):
        plan_float_layers(trained_tiny_vit, "int8_dynamic", spec, heldout)
    with pytest.raises(ValueError, match=r"float_layers\[0\]='blocks.9' is invalid"):
        plan_float_layers(trained_tiny_vit, "int8_dynamic", MixedPrecision(float_layers=("blocks.9",)), heldout)


def test_the_model_is_never_modified(trained_tiny_vit, heldout):
    before = copy.deepcopy(trained_tiny_vit.state_dict())
    analyze_sensitivity(trained_tiny_vit, "int8_dynamic", heldout[:1], granularity="block")
    assert all(torch.equal(before[k], v) for k, v in trained_tiny_vit.state_dict().items())
    assert not trained_tiny_vit.training
