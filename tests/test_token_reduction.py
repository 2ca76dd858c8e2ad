"""The token-reduction engine (``pqv_lightning.tokens``): ToMe merging and EViT pruning on tiny timm models."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

from pqv_lightning.tokens import (
    ReducedCait,
    ReducedVisionTransformer,
    ReducedVisionTransformerDistilled,
    TokenReduction,
    apply_token_reduction,
    bipartite_soft_matching,
    check_token_reduction,
    fuse_inattentive,
    is_token_reduced,
    merge_wavg,
    remove_token_reduction,
    token_reduction_of,
    tokens_per_block,
)
from pqv_lightning.tokens.blocks import reduce_tokens, reducing_block
from pqv_lightning.utils.checks import InvalidArgumentError

#: 32 px grey images, 4 px patches: 64 patch tokens, 2 blocks, 32 wide.
TINY = {"img_size": 32, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2}
#: name, extra timm kwargs, prefix tokens, reduced class
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}, 1, ReducedVisionTransformer),
    "vit_avg": ("vit_tiny_patch16_224", {"global_pool": "avg"}, 1, ReducedVisionTransformer),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2, ReducedVisionTransformerDistilled),
    "deit3_layer_scale": ("deit3_small_patch16_224", {"init_values": 0.5}, 1, ReducedVisionTransformer),
    "registers_qk_norm": ("vit_tiny_patch16_224", {"reg_tokens": 4, "qk_norm": True}, 5, ReducedVisionTransformer),
    "no_class_token_avg": (
        "vit_tiny_patch16_224",
        {"class_token": False, "global_pool": "avg"},
        0,
        ReducedVisionTransformer,
    ),
    "cait": ("cait_xxs24_224", {}, 0, ReducedCait),
}


def tiny(family: str, **kwargs) -> torch.nn.Module:
    name, extra, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **{**TINY, **extra, **kwargs}).eval()


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_r_zero_is_the_original_model(family, fused):
    model = tiny(family)
    set_fused(model, fused)
    x = images()
    with torch.no_grad():
        expected = model(x)
        reduced = apply_token_reduction(copy.deepcopy(model), TokenReduction("merge", r=0))
        assert type(reduced) is FAMILIES[family][3]
        torch.testing.assert_close(reduced(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "cait"])
def test_proportional_attention_with_sizes_one_changes_nothing(family):
    model = tiny(family)
    blk = model.blocks[0]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        plain, _ = reducing_block(blk, x, None, 0, "merge", 1, True)
        ones, size = reducing_block(blk, x, torch.ones(2, 17, 1), 0, "merge", 1, True)
    torch.testing.assert_close(ones, plain, rtol=0, atol=1e-6)
    assert torch.equal(size, torch.ones(2, 17, 1))


# --------------------------------------------------------------------------- matching and merging
def tome_reference(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    """ToMe's own bipartite_soft_matching + merge_wavg (facebookresearch/ToMe, no protected tokens)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged = merge(x * size)
    new_size = merge(size)
    return merged / new_size, new_size


@pytest.mark.parametrize("tokens", [16, 17])
def test_merge_is_tomes(tokens):
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(3, tokens, 8, generator=g), torch.randn(3, tokens, 5, generator=g)
    size = torch.randint(1, 4, (3, tokens, 1), generator=g).float()
    for r in (1, 4, tokens // 2):
        got_x, got_size = merge_wavg(x, size, bipartite_soft_matching(metric, r))
        want_x, want_size = tome_reference(x, size, metric, r)
        torch.testing.assert_close(got_x, want_x)
        assert torch.equal(got_size, want_size)
        assert got_x.shape == (3, tokens - r, 8)
        assert torch.equal(got_size.sum(dim=1), size.sum(dim=1))  # every original token is somewhere, once


def test_merged_token_is_the_size_weighted_mean():
    # tokens 0 and 1 point the same way (the only similar pair): they merge; 2 and 3 stay
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    x = torch.tensor([[[2.0], [8.0], [5.0], [7.0]]])
    size = torch.tensor([[[3.0], [1.0], [1.0], [1.0]]])
    out, out_size = merge_wavg(x, size, bipartite_soft_matching(metric, 1))
    assert sorted(out.flatten().tolist()) == [3.5, 5.0, 7.0]  # (2 * 3 + 8 * 1) / 4
    assert sorted(out_size.flatten().tolist()) == [1.0, 1.0, 4.0]


def test_prefix_tokens_are_never_merged_or_pruned():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 21, 8, generator=g), torch.randn(2, 21, 8, generator=g)
    # a prefix token identical to a patch token would be its best match if it could be matched at all
    x[:, 1], metric[:, 1] = x[:, 7], metric[:, 7]
    attention = torch.rand(2, 21, generator=g)
    attention[:, :5] = 10.0
    for method, found in (("merge", metric), ("prune", attention)):
        out, size = reduce_tokens(x, None, found, 8, method, prefix=5)
        assert out.shape == (2, 13, 8)
        assert torch.equal(out[:, :5], x[:, :5])
        assert torch.equal(size[:, :5], torch.ones(2, 5, 1))
        assert torch.equal(size.sum(dim=1), torch.full((2, 1), 21.0))


def test_prune_keeps_the_most_attended_and_fuses_the_rest():
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1)
    attention = torch.tensor([[0.30, 0.02, 0.25, 0.01, 0.20, 0.03, 0.15, 0.04]])
    out, size = fuse_inattentive(x, torch.ones(1, 8, 1), attention, r=3)
    assert out.shape == (1, 5, 1)
    assert out[0, :4, 0].tolist() == [0.0, 2.0, 4.0, 6.0]  # ranked by attention
    fused = (1 * 0.02 + 3 * 0.01 + 5 * 0.03 + 7 * 0.04) / 0.10
    assert out[0, 4, 0].item() == pytest.approx(fused, rel=1e-6)
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 4.0]


@pytest.mark.parametrize(
    ("family", "method"),
    [(f, m) for f in ("vit", "deit_distilled", "registers_qk_norm") for m in ("merge", "prune")] + [("cait", "merge")],
)
def test_sizes_add_up_and_match_tokens_per_block(family, method):
    model = apply_token_reduction(tiny(family, depth=3), TokenReduction(method, r=7))
    prefix = FAMILIES[family][2]
    counts = tokens_per_block(model)
    assert counts == [64 + prefix - 7 * i for i in range(4)]
    with torch.no_grad():
        features, size = model.forward_tokens(images())
    total = 64 + (1 if family == "cait" else prefix)  # CaiT's class token joins after its merging blocks
    assert features.shape[1] == counts[-1] + (1 if family == "cait" else 0)
    assert torch.equal(size.sum(dim=1), torch.full((3, 1), float(total)))


def test_avg_pool_is_the_mean_over_the_original_tokens():
    model = tiny("vit_avg")
    reduced = apply_token_reduction(copy.deepcopy(model), TokenReduction("merge", r=16))
    tokens = torch.randn(2, 49, 32)
    size = torch.randint(1, 5, (2, 49, 1)).float()
    # expand every token into `size` copies: the plain mean over them is the weighted pooling
    expanded = [torch.repeat_interleave(tokens[i, 1:], size[i, 1:, 0].long(), dim=0).mean(0) for i in range(2)]
    torch.testing.assert_close(reduced.pool(tokens, size=size), torch.stack(expanded))
    torch.testing.assert_close(reduced.pool(tokens), model.pool(tokens))  # nothing merged: timm's pooling


def test_batch_images_reduce_independently():
    model = apply_token_reduction(tiny("vit"), TokenReduction("merge", r=12))
    x = images(4)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_fused_and_eager_attention_agree_when_reducing():
    model = apply_token_reduction(tiny("vit_avg"), TokenReduction("merge", r=12))
    x = images()
    with torch.no_grad():
        set_fused(model, True)
        fused = model(x)
        set_fused(model, False)
        eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_reduced_model_trains():
    model = apply_token_reduction(tiny("registers_qk_norm"), TokenReduction("merge", r=10)).train()
    loss = torch.nn.functional.cross_entropy(model(images()), torch.tensor([0, 1, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- schedules
def test_schedules():
    assert TokenReduction(r=8).per_block(4) == (8, 8, 8, 8)
    decreasing = TokenReduction(r=8, schedule="decreasing").per_block(12)
    assert decreasing == (16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0)  # ToMe's parse_r((8, -1))
    assert TokenReduction(schedule=[3, 0, 5]).per_block(3) == (3, 0, 5)
    with pytest.raises(InvalidArgumentError, match=r"schedule=\[3, 0, 5\] is invalid; accepted: a list of 2 ints"):
        apply_token_reduction(tiny("vit"), TokenReduction(schedule=[3, 0, 5]))
    model = apply_token_reduction(tiny("vit", depth=3), TokenReduction(schedule=[3, 0, 5]))
    assert tokens_per_block(model) == [65, 62, 62, 57]
    assert tokens_per_block(model, img_size=16) == [17, 14, 14, 9]


def test_r_is_capped_at_half_the_patch_tokens():
    model = apply_token_reduction(tiny("deit_distilled", depth=4), TokenReduction("merge", r=100))
    assert tokens_per_block(model) == [66, 34, 18, 10, 6]  # prefix 2 kept, half of the rest merged each block
    with torch.no_grad():
        assert model.forward_tokens(images())[0].shape[1] == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "tome"}, "method='tome' is invalid; accepted: merge, prune"),
        ({"r": -1}, "r=-1 is invalid"),
        ({"r": 2.5}, "r=2.5 is invalid"),
        ({"schedule": "linear"}, "schedule='linear' is invalid"),
        ({"schedule": []}, r"schedule=\[\] is invalid"),
        ({"schedule": [1, -2]}, r"schedule\[1\]=-2 is invalid"),
        ({"proportional_attention": "yes"}, "proportional_attention='yes' is invalid"),
    ],
)
def test_spec_refuses_bad_settings(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        TokenReduction(**kwargs)


def test_spec_round_trips_as_plain_data():
    spec = TokenReduction("prune", r=5, schedule=[1, 2, 3])
    data = spec.as_dict()
    assert data == {"method": "prune", "r": 5, "schedule": [1, 2, 3], "proportional_attention": False}
    assert TokenReduction.from_dict(data) == spec
    assert TokenReduction().proportional_attention is True
    with pytest.raises(InvalidArgumentError, match="unknown keys"):
        TokenReduction.from_dict({**data, "ratio": 0.5})


# --------------------------------------------------------------------------- apply / remove / state
def test_apply_is_idempotent_keeps_state_dict_and_removes_cleanly():
    model = tiny("deit_distilled")
    x = images()
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    spec = TokenReduction("merge", r=9)
    assert apply_token_reduction(model, spec) is model
    with torch.no_grad():
        once = model(x)
    apply_token_reduction(model, spec)
    with torch.no_grad():
        assert torch.equal(model(x), once)
    assert list(model.state_dict()) == keys
    assert token_reduction_of(model) == spec and is_token_reduced(model)
    copied = copy.deepcopy(model)  # the fit-end chain copies the trained model: the copy must keep the reduction
    assert token_reduction_of(copied) == spec
    with torch.no_grad():
        assert torch.equal(copied(x), once)
    fresh = tiny("deit_distilled")
    fresh.load_state_dict(model.state_dict())  # reduced weights load into a plain model and back
    model.load_state_dict(fresh.state_dict())
    remove_token_reduction(model)
    assert type(model).__name__ == "VisionTransformerDistilled" and token_reduction_of(model) is None
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_pruning_a_reduced_model_gives_the_same_network_in_either_order():
    from pqv_lightning.pruning import PruningSpec, prune

    spec = PruningSpec(ratio=0.25)
    example = images(1)
    dense_first = tiny("vit", depth=3)
    prune(dense_first, spec, example)
    for method in ("merge", "prune"):
        reduced_first = apply_token_reduction(tiny("vit", depth=3), TokenReduction(method, r=8))
        prune(reduced_first, spec, example)
        assert token_reduction_of(reduced_first).method == method
        pruned, other = dense_first.state_dict(), reduced_first.state_dict()
        assert pruned.keys() == other.keys() and all(torch.equal(pruned[k], other[k]) for k in pruned)
        reduced_after = apply_token_reduction(copy.deepcopy(dense_first), TokenReduction(method, r=8))
        with torch.no_grad():
            torch.testing.assert_close(reduced_after(images()), reduced_first(images()))


# --------------------------------------------------------------------------- refusals
REFUSED = {
    "beit_base_patch16_224": ({"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}, "relative position bias"),
    "eva02_tiny_patch14_224": ({"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 28}, "RoPE"),
    "swin_tiny_patch4_window7_224": (
        {"depths": (1, 1), "embed_dim": 16, "num_heads": (1, 1), "img_size": 56},
        "windowed attention",
    ),
    "levit_128s": ({}, "2-D stages"),
    "mobilevit_xxs": ({}, "2-D stages"),
    "pit_ti_224": ({}, "2-D stages"),
    "efficientvit_m0": ({}, "2-D stages"),
    "fastvit_t8": ({}, "2-D stages"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_families_are_refused_with_the_reason(name):
    kwargs, reason = REFUSED[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    with pytest.raises(InvalidArgumentError, match=rf"model='{type(model).__name__}' is invalid; accepted: .*{reason}"):
        apply_token_reduction(model, TokenReduction())
    assert not is_token_reduced(model)


@pytest.mark.parametrize(
    ("kwargs", "spec", "message"),
    [
        ({"block_fn": ResPostBlock}, TokenReduction(), "blocks.0 is a ResPostBlock, not timm's Block"),
        ({"global_pool": "map"}, TokenReduction(), "attention pooling"),
        ({"global_pool": "max"}, TokenReduction(), "global_pool='max'"),
        ({"global_pool": ""}, TokenReduction(), "no pooling"),
        ({"class_token": False, "global_pool": "avg"}, TokenReduction("prune"), "method='prune' is invalid"),
    ],
)
def test_unsupported_vit_variants_are_refused(kwargs, spec, message):
    model = tiny("vit", **kwargs)
    with pytest.raises(InvalidArgumentError, match=message):
        check_token_reduction(model, spec)


def test_cait_refuses_pruning_and_not_a_module():
    with pytest.raises(InvalidArgumentError, match="'merge' for Cait"):
        apply_token_reduction(tiny("cait"), TokenReduction("prune"))
    with pytest.raises(InvalidArgumentError, match="model='str' is invalid"):
        check_token_reduction("deit_small_patch16_224")
    with pytest.raises(InvalidArgumentError, match="spec=8 is invalid"):
        apply_token_reduction(tiny("vit"), 8)


def test_reduced_model_refuses_attention_masks():
    model = apply_token_reduction(tiny("vit"), TokenReduction())
    with pytest.raises(ValueError, match="takes no attention mask"):
        model(images(), attn_mask=torch.zeros(65, 65))


# --------------------------------------------------------------------------- export
def exported_tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A reduced distilled DeiT in the attention form the export rewrites use, an example and other images."""
    model = apply_token_reduction(tiny("deit_distilled"), TokenReduction("merge", r=12))
    set_fused(model, False)
    return model, images(2, seed=3), images(2, seed=4)


def test_torch_export_gives_the_eager_outputs():
    model, example, other = exported_tiny()
    with torch.no_grad():
        expected = model(other)
        program = torch.export.export(model, (example,), strict=False)
        torch.testing.assert_close(program.module()(other), expected, rtol=1e-5, atol=1e-5)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"aten.topk.default", "aten.scatter_add.default", "aten.gather.default"} <= targets
    assert not {"aten.sort.default", "aten.argsort.default", "aten.linalg_vector_norm.default"} & targets


@pytest.mark.slow
def test_onnx_export_gives_the_eager_outputs():
    onnxruntime = pytest.importorskip("onnxruntime")
    model, example, other = exported_tiny()
    with torch.no_grad():
        expected = model(other)
        onnx_program = torch.onnx.export(model, (example,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(got.sum()))
