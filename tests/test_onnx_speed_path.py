"""ONNX int8 speed path: the onnxruntime-friendly rewrite computes the model's function, onnxruntime's fusions
apply (attention -> QAttention, no SkipLayerNormalization, no ConvInteger), and the file still verifies."""

from __future__ import annotations

import collections
import copy
import re

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper
from timm.layers import Attention

from pqv_lightning import export as ex
from pqv_lightning.export import is_patchify_conv, prepare_for_onnxruntime
from pqv_lightning.export import onnxruntime_rewrites as rewrites

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 64, "num_heads": 4}
BATCH = 8


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **{**TINY, **kwargs}).eval()


def _pruned_like(fused_attn: bool) -> torch.nn.Module:
    """3 heads of 12 dims (attn_dim 36 != embed_dim 64) with a stored scale that is not head_dim ** -0.5."""
    model = _vit()
    for block in model.blocks:
        attn = Attention(64, num_heads=3, attn_head_dim=12, qkv_bias=True)
        attn.scale = 16**-0.5
        attn.fused_attn = fused_attn
        block.attn = attn
    return model.eval()


MODELS = {
    "cls_token": lambda: _vit(),
    "avg_pool": lambda: _vit(global_pool="avg"),
    "no_qkv_bias": lambda: _vit(qkv_bias=False),
    "pruned_like_eager_path": lambda: _pruned_like(fused_attn=False),
    "pruned_like_sdpa_path": lambda: _pruned_like(fused_attn=True),
    "distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, **TINY
    ).eval(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_prepare_for_onnxruntime_computes_the_same_function(name: str) -> None:
    model = MODELS[name]()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        prepared, counts = prepare_for_onnxruntime(model)
        torch.testing.assert_close(prepared(x), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), before)  # the original is untouched
    assert counts == {"attention": 2, "patchify_conv": 1}
    assert all(type(b.attn) is Attention for b in model.blocks)
    assert type(model.patch_embed.proj) is torch.nn.Conv2d
    assert all(type(b.attn) is rewrites._OrtAttention for b in prepared.blocks)


def test_prepare_leaves_attention_it_cannot_express_alone() -> None:
    model = _vit(qk_norm=True)
    prepared, counts = prepare_for_onnxruntime(model)
    assert counts["attention"] == 0
    assert all(type(b.attn) is Attention for b in prepared.blocks)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), atol=1e-5, rtol=1e-5)


def test_masked_call_goes_to_the_original_attention() -> None:
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    wrapped = rewrites._OrtAttention(attn)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(5, 5, dtype=torch.bool).triu(1).logical_not()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, attn_mask=mask), attn(x, attn_mask=mask))
        torch.testing.assert_close(wrapped(x), attn(x), atol=1e-6, rtol=1e-5)


def test_patchify_linear_matches_conv_on_an_uneven_image() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 18, 23)  # not a multiple of the patch: the conv drops the remainder
    with torch.no_grad():
        torch.testing.assert_close(rewrites._PatchifyLinear(conv)(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("conv", "applies"),
    [
        (torch.nn.Conv2d(3, 8, 4, stride=4), True),
        (torch.nn.Conv2d(3, 8, 4, stride=4, bias=False), True),
        (torch.nn.Conv2d(3, 8, 4, stride=2), False),
        (torch.nn.Conv2d(3, 8, 4, stride=4, padding=1), False),
        (torch.nn.Conv2d(4, 8, 4, stride=4, groups=2), False),
        (torch.nn.Conv2d(3, 8, 3, stride=3, dilation=2), False),
        (torch.nn.Linear(3, 8), False),
    ],
)
def test_patchify_rewrite_only_takes_non_overlapping_convs(conv: torch.nn.Module, applies: bool) -> None:
    assert is_patchify_conv(conv) is applies


def _skip_ln_model(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    hidden = 8

    def init(name: str) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, [hidden], rng.standard_normal(hidden).astype(np.float32))

    inputs = ["x", "skip", "gamma", "beta"] + (["bias"] if with_bias else [])
    node = helper.make_node(
        "SkipLayerNormalization", inputs, ["y", "", "", "sum"], name="sln", domain="com.microsoft", epsilon=1e-5
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, hidden]) for n in ("x", "skip")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, hidden]) for n in ("y", "sum")],
        [init(n) for n in inputs[2:]],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("with_bias", [True, False])
def test_unfused_skip_layer_norm_gives_the_same_outputs(with_bias: bool) -> None:
    model = _skip_ln_model(with_bias)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("x", "skip")}
    fused = _run(model, feeds)
    assert rewrites._unfuse_skip_layer_norm(model.graph) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 1
    for got, want in zip(_run(model, feeds), fused, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_projection_branch_goes_first_in_residual_adds() -> None:
    nodes = [
        helper.make_node("Add", ["a", "b"], ["residual"], name="pos_add"),
        helper.make_node("MatMul", ["residual", "w"], ["mm"], name="proj"),
        helper.make_node("Add", ["mm", "bias"], ["projected"], name="proj_bias"),
        helper.make_node("Add", ["residual", "projected"], ["out"], name="residual_add"),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    assert rewrites._projection_branch_first(graph) == 1
    by_name = {n.name: list(n.input) for n in graph.node}
    assert by_name["residual_add"] == ["projected", "residual"]
    assert by_name["proj_bias"] == ["mm", "bias"] and by_name["pos_add"] == ["a", "b"]
    assert rewrites._projection_branch_first(graph) == 0


# --------------------------------------------------------------------------- through export_artifacts


@pytest.fixture(scope="module")
def data(digit_tensors):
    xv, yv = digit_tensors["x_heldout"], digit_tensors["y_heldout"]
    val = [(xv[i : i + 64], yv[i : i + 64]) for i in range(0, len(xv), 64)]
    return digit_tensors["x_train"][:BATCH].clone(), val


def _ops(path: str) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def _eager_top1(model: torch.nn.Module, val) -> float:
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).sum().item() for x, y in val) / sum(len(y) for _, y in val)


def _check_fused_int8(rec, depth: int) -> None:
    assert rec.status == "ok", rec.reason
    assert rec.extra["onnxruntime_optimized"] is True
    assert rec.extra["ort_fusions"]["Attention"] == depth
    assert rec.extra["skip_layer_norm_unfused"] > 0
    ops = _ops(rec.path)
    assert ops["QAttention"] == depth
    for absent in ("SkipLayerNormalization", "ConvInteger", "Conv", "Attention"):
        assert ops[absent] == 0, (absent, dict(ops))


def test_onnx_int8_is_fused_quantized_and_agrees_with_eager(trained_tiny_vit, data, tmp_path):
    example, val = data
    records = ex.export_artifacts(trained_tiny_vit, tmp_path, ["onnx"], example, val, onnx_precisions=("fp32", "int8"))
    recs = {r.name: r for r in records}
    fp32, int8 = recs["onnx-fp32"], recs["onnx-int8"]
    assert fp32.status == "ok", fp32.reason
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(fp32.path).graph.node)  # fp32 stays plain ONNX
    _check_fused_int8(int8, depth=len(trained_tiny_vit.blocks))
    assert int8.extra["prepared_for_onnxruntime"] == {"attention": 2, "patchify_conv": 1}
    assert int8.top1_agreement >= 0.97 and int8.extra["verified_images"] == 540
    assert abs(int8.val_top1 - _eager_top1(trained_tiny_vit, val)) <= 0.02

    # independent of the export engine's verifier: onnxruntime on held-out images against eager logits
    import onnxruntime as ort

    session = ort.InferenceSession(int8.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = val[0][0][:BATCH]
    got = torch.from_numpy(session.run(None, {name: images.numpy()})[0])
    with torch.no_grad():
        want = trained_tiny_vit(images)
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.875
    assert (got - want).abs().max().item() < 0.25 * want.abs().max().item()


def test_onnx_int8_of_a_pruned_model_is_fused(trained_tiny_vit, data, tmp_path):
    from pqv_lightning.pruning import PruningSpec, prune

    example, val = data
    pruned = copy.deepcopy(trained_tiny_vit)
    prune(pruned, PruningSpec(ratio=0.25, importance="l2"), example)
    pruned.eval()
    (rec,) = ex.export_artifacts(pruned, tmp_path, ["onnx"], example, val, onnx_precisions=("int8",))
    _check_fused_int8(rec, depth=len(pruned.blocks))
    assert rec.top1_agreement >= 0.97


def test_onnx_int8_falls_back_to_the_plain_graph_with_the_reason(trained_tiny_vit, data, tmp_path, monkeypatch):
    example, val = data

    def broken(*args, **kwargs):
        raise RuntimeError("fusion exploded")

    monkeypatch.setattr(rewrites, "fuse_for_onnxruntime", broken)
    (rec,) = ex.export_artifacts(trained_tiny_vit, tmp_path, ["onnx"], example, val[:2], onnx_precisions=("int8",))
    assert rec.status == "ok", rec.reason
    assert rec.extra["onnxruntime_optimized"] is False
    assert "fusion exploded" in rec.extra["onnxruntime_optimization_failed"]
    assert _ops(rec.path)["QAttention"] == 0 and _ops(rec.path)["MatMulInteger"] > 0


def test_onnx_optimize_false_quantizes_the_plain_graph(trained_tiny_vit, data, tmp_path):
    example, val = data
    (rec,) = ex.export_artifacts(
        trained_tiny_vit, tmp_path, ["onnx"], example, val[:2], onnx_precisions=("int8",), onnx_optimize=False
    )
    assert rec.status == "ok", rec.reason
    assert rec.extra["onnxruntime_optimized"] is False and "onnxruntime_optimization_failed" not in rec.extra
    assert _ops(rec.path)["QAttention"] == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_onnx_optimize_must_be_a_bool_checked_before_any_export(trained_tiny_vit, data, tmp_path, monkeypatch, bad):
    example, val = data

    def forbidden(*args, **kwargs):
        raise AssertionError("exported before validating onnx_optimize")

    monkeypatch.setattr(torch.onnx, "export", forbidden)
    with pytest.raises(TypeError, match=re.escape(f"onnx_optimize={bad!r} is invalid; accepted: True or False")):
        ex.export_artifacts(trained_tiny_vit, tmp_path, ["onnx"], example, val[:1], onnx_optimize=bad)


@pytest.mark.parametrize("bad", ["vit_tiny", None, torch.zeros(2)])
def test_prepare_for_onnxruntime_rejects_non_modules(bad) -> None:
    with pytest.raises(TypeError, match=r"model=.* is invalid; accepted: a torch\.nn\.Module"):
        prepare_for_onnxruntime(bad)
