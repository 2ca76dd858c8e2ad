"""Tests of the structured-pruning engine (tiny timm models, CPU)."""

from __future__ import annotations

import copy
import io
import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp
from timm.layers import Attention

from pqv_lightning.pruning import (
    PruningSpec,
    UnsupportedModelError,
    apply_structure,
    check_budget,
    check_supported,
    prune,
)

VIT_NAMES = [
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224",
]


def tiny_vit(name: str = "deit_tiny_patch16_224", **kw) -> torch.nn.Module:
    cfg = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **cfg)


def batches(n: int = 2, size: int = 32, bs: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def eager_reference(pruned: torch.nn.Module, structure: dict) -> torch.nn.Module:
    """The pruned network with the trained scale kept explicitly (q unscaled, scale = trained, eager)."""
    ref = copy.deepcopy(pruned)
    for name, info in structure["extra"]["attention"].items():
        a = ref.get_submodule(name)
        factor = info["scale"] / a.scale
        with torch.no_grad():
            a.qkv.weight[: a.attn_dim] /= factor
            if a.qkv.bias is not None:
                a.qkv.bias[: a.attn_dim] /= factor
        a.scale = info["scale"]
        a.fused_attn = False
    return ref


@pytest.mark.parametrize("name", VIT_NAMES)
@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_vit_family_prune_replay_train(name: str, importance: str) -> None:
    dense = tiny_vit(name)
    model = copy.deepcopy(dense)
    data = batches()
    x = data[0][0]
    result = prune(model, PruningSpec(ratio=0.25, importance=importance), x, calibration=data)

    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    assert sum(p.numel() for p in model.parameters()) == result.params_after
    for a in model.modules():
        if isinstance(a, Attention):
            assert (a.num_heads, a.head_dim, a.attn_dim) == (4, 12, 48)
            assert a.scale == pytest.approx(12**-0.5)
            assert a.qkv.out_features == 3 * a.attn_dim and a.proj.in_features == a.attn_dim
    assert result.layer_widths["blocks.0.mlp.fc1"] == (256, 192)
    heads = ["head", "head_dist"] if "distilled" in name else ["head"]
    for h in heads:  # classifier heads keep their outputs
        assert model.get_submodule(h).out_features == 10
        assert h not in result.layer_widths

    replay = copy.deepcopy(dense)
    apply_structure(replay, result.structure)
    assert_same_state(model, replay)

    model.eval()
    set_fused(model, True)
    fused = model(x)
    set_fused(model, False)
    eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(eager_reference(model, result.structure)(x), eager, rtol=1e-5, atol=1e-5)
    train_step(model, *data[1])


def test_fold_matters() -> None:
    """Without the fold, SDPA's default scale from the new head_dim would change the function."""
    model = tiny_vit()
    x = batches()[0][0]
    result = prune(model, PruningSpec(ratio=0.5), x)
    model.eval()
    ref = eager_reference(model, result.structure)
    set_fused(ref, True)  # trained-scale q with SDPA: what an unfixed export would compute
    with torch.no_grad():
        assert not torch.allclose(ref(x), model(x), atol=1e-4)


def _direct_torch_pruning(model, example, ratio, imp, prune_heads=False, bottleneck=False, round_to=None):
    """torch-pruning's examples/transformers/prune_timm_vit.py settings, called directly."""
    num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    ignored = [model.head] + ([m.mlp.fc2 for m in model.blocks] if bottleneck else [])
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        global_pruning=False,
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=prune_heads,
        prune_head_dims=not prune_heads,
        head_pruning_ratio=ratio if prune_heads else 0.0,
        round_to=round_to,
    )
    for g in pruner.step(interactive=True):
        g.prune()
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("ratio", "kw"),
    [(0.25, {}), (0.5, {"prune_heads": True}), (0.25, {"bottleneck": True}), (0.25, {"round_to": 8})],
)
def test_defaults_match_torch_pruning(ratio: float, kw: dict) -> None:
    dense = tiny_vit()
    x = batches()[0][0]
    direct = copy.deepcopy(dense)
    n_direct = _direct_torch_pruning(direct, x, ratio, tp.importance.GroupMagnitudeImportance(p=2), **kw)
    ours = copy.deepcopy(dense)
    result = prune(ours, PruningSpec(ratio=ratio, **kw), x)
    assert result.params_after == n_direct < result.params_before
    sd_direct = direct.state_dict()
    for k, v in ours.state_dict().items():
        assert v.shape == sd_direct[k].shape, k
        if "qkv" not in k:  # qkv holds the folded softmax-scale correction
            assert torch.equal(v, sd_direct[k]), k


def test_head_pruning_and_bottleneck() -> None:
    dense = tiny_vit()
    x = batches()[0][0]
    model = copy.deepcopy(dense)
    result = prune(model, PruningSpec(ratio=0.5, prune_heads=True, bottleneck=True), x)
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (2, 16)
    assert model.embed_dim == 64 and model.blocks[0].mlp.fc2.out_features == 64
    assert model.blocks[0].mlp.fc1.out_features == 128
    replay = copy.deepcopy(dense)
    apply_structure(replay, result.structure)
    assert_same_state(model, replay)
    model.eval()
    set_fused(model, False)
    eager = model(x)
    set_fused(model, True)
    torch.testing.assert_close(model(x), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.09375, 0.25, 0.5])
def test_deit_ratios(ratio: float) -> None:
    dense = tiny_vit(embed_dim=192, num_heads=3, depth=1)  # DeiT-Tiny widths, one block
    model = copy.deepcopy(dense)
    data = batches()
    result = prune(model, PruningSpec(ratio=ratio), data[0][0])
    keep = round(64 * (1 - ratio))
    assert model.blocks[0].attn.head_dim == keep and model.embed_dim == 192
    assert model.patch_embed.proj.out_channels == round(192 * (1 - ratio))
    replay = copy.deepcopy(dense)
    apply_structure(replay, result.structure)
    assert_same_state(model, replay)
    train_step(model, *data[1])


def test_hessian_random_and_global() -> None:
    data = batches()
    for spec in (
        PruningSpec(ratio=0.25, importance="hessian"),
        PruningSpec(ratio=0.25, importance="random"),
        PruningSpec(ratio=0.25, global_pruning=True),
        PruningSpec(ratio=0.25, importance=tp.importance.GroupMagnitudeImportance(p=1)),
    ):
        dense = tiny_vit()
        model = copy.deepcopy(dense)
        result = prune(model, spec, data[0][0], calibration=data)
        assert result.params_after < result.params_before
        replay = copy.deepcopy(dense)
        apply_structure(replay, result.structure)
        assert_same_state(model, replay)
        train_step(model, *data[1])


def test_grad_reduce_averages_statistics() -> None:
    """A grad_reduce mixing in another rank's gradients gives the structure of pruning on both ranks' data."""
    dense = tiny_vit()
    a, b = batches(1, seed=3), batches(1, seed=4)
    spec = PruningSpec(ratio=0.25, importance="taylor", calibration_batches=1)
    rank_b: list[torch.Tensor] = []
    prune(copy.deepcopy(dense), spec, a[0][0], calibration=b, grad_reduce=lambda g: rank_b.append(g) or g)
    assert len(rank_b) == sum(1 for p in dense.parameters())
    it = iter(rank_b)
    reduced = prune(copy.deepcopy(dense), spec, a[0][0], calibration=a, grad_reduce=lambda g: (g + next(it)) / 2)
    both = prune(
        copy.deepcopy(dense),
        PruningSpec(ratio=0.25, importance="taylor", calibration_batches=2),
        a[0][0],
        calibration=a + b,
    )
    only_a = prune(copy.deepcopy(dense), spec, a[0][0], calibration=a)
    assert reduced.structure["ops"] == both.structure["ops"]
    assert reduced.structure["ops"] != only_a.structure["ops"]


def test_calibration_leaves_weights_and_grads_alone() -> None:
    model = tiny_vit()
    data = batches()
    prune(model, PruningSpec(ratio=0.0, importance="taylor"), data[0][0], calibration=data)
    assert_same_state(model, tiny_vit())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("metric", ["target_params", "target_macs"])
def test_budget(metric: str) -> None:
    dense = tiny_vit()
    x = batches()[0][0]
    ref = prune(copy.deepcopy(dense), PruningSpec(ratio=0.0), x)
    before = ref.params_before if metric == "target_params" else ref.macs_before
    target = 0.6 * before
    model = copy.deepcopy(dense)
    result = prune(model, PruningSpec(ratio=None, **{metric: target}), x)
    after = result.params_after if metric == "target_params" else result.macs_after
    assert after <= target
    looser = prune(copy.deepcopy(dense), PruningSpec(ratio=result.ratio - 1 / 16), x)
    assert (looser.params_after if metric == "target_params" else looser.macs_after) > target
    replay = copy.deepcopy(dense)
    apply_structure(replay, result.structure)
    assert_same_state(model, replay)
    with pytest.raises(ValueError, match="unreachable"):
        prune(copy.deepcopy(dense), PruningSpec(ratio=None, **{metric: 0.01 * before}), x)


@pytest.mark.parametrize("metric", ["target_params", "target_macs"])
def test_check_budget_knows_the_smallest_reachable_size_without_data(metric: str) -> None:
    """Before training: the size at the largest ratio, from a magnitude trial, is what the Taylor search reaches."""
    dense = tiny_vit()
    data = batches()
    x = data[0][0]
    with pytest.raises(ValueError, match="unreachable") as refused:
        prune(copy.deepcopy(dense), PruningSpec(ratio=None, importance="taylor", **{metric: 1.0}), x, calibration=data)
    smallest = int(re.search(r"accepted: a budget >= (\d+)", str(refused.value)).group(1))
    untouched = copy.deepcopy(dense)
    with pytest.raises(ValueError, match=rf"target_{metric[7:]}=1 is unreachable.*accepted: a budget >= {smallest}\."):
        check_budget(untouched, PruningSpec(ratio=None, importance="taylor", **{metric: 1.0}), x)
    assert_same_state(untouched, dense)  # checked on a copy
    check_budget(untouched, PruningSpec(ratio=None, importance="taylor", **{metric: smallest}), x)  # reachable: quiet


def test_structure_is_plain_data() -> None:
    dense = tiny_vit("deit3_small_patch16_224")
    model = copy.deepcopy(dense)
    result = prune(model, PruningSpec(ratio=0.25), batches()[0][0])
    assert result.structure["version"] == 1
    via_json = json.loads(json.dumps(result.structure))
    buf = io.BytesIO()
    torch.save(result.structure, buf)
    buf.seek(0)
    via_torch = torch.load(buf, weights_only=True)
    for s in (via_json, via_torch):
        replay = copy.deepcopy(dense)
        apply_structure(replay, s)
        assert_same_state(model, replay)


def test_structure_mismatch() -> None:
    model = tiny_vit()
    structure = prune(model, PruningSpec(ratio=0.25), batches()[0][0]).structure
    with pytest.raises(ValueError, match="does not match"):
        apply_structure(tiny_vit(embed_dim=32), structure)
    with pytest.raises(ValueError, match="does not match"):
        apply_structure(tiny_vit(depth=3), structure)
    with pytest.raises(ValueError, match="does not match"):
        apply_structure(model, structure)  # already pruned
    with pytest.raises(ValueError, match="family"):
        apply_structure(tiny_vit(), {**structure, "family": "efficientvit_mit"})
    with pytest.raises(ValueError, match="version"):
        apply_structure(tiny_vit(), {**structure, "version": 99})
    with pytest.raises(ValueError, match="not a pruning structure"):
        apply_structure(tiny_vit(), {"ops": []})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, r"ratio=1.0 .*\[0, 1\)"),
        ({"ratio": -0.1}, r"ratio=-0.1"),
        ({"importance": "fisher"}, r"fisher.*l1, l2, taylor, hessian, random"),
        ({"ratio": 0.2, "target_macs": 1e6}, "not both"),
        ({"ratio": None}, "needs a budget"),
        ({"ratio": None, "target_macs": 1e6, "target_params": 1e5}, "one budget"),
        ({"ratio": None, "target_params": -5}, "positive"),
        ({"round_to": 0}, "round_to=0"),
        ({"calibration_batches": 0}, "calibration_batches=0"),
    ],
)
def test_spec_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningSpec(**kwargs)


def test_input_errors_before_work() -> None:
    model = tiny_vit()
    x = batches()[0][0]
    with pytest.raises(ValueError, match="calibration"):
        prune(model, PruningSpec(importance="taylor"), x)
    with pytest.raises(ValueError, match="round_to=64"):
        prune(model, PruningSpec(ratio=0.25, round_to=64), x)
    with pytest.raises(ValueError, match="all 4 heads"):
        prune(model, PruningSpec(ratio=0.8, prune_heads=True), x)
    with pytest.raises(ValueError, match="not modules"):
        prune(model, PruningSpec(ignored_layers=("blocks.9.mlp",)), x)
    assert_same_state(model, tiny_vit())


def test_ignored_layers() -> None:
    model = tiny_vit()
    result = prune(model, PruningSpec(ratio=0.5, ignored_layers=("blocks.0.mlp.fc1",)), batches()[0][0])
    assert model.blocks[0].mlp.fc1.out_features == 256
    assert result.layer_widths["blocks.1.mlp.fc1"] == (256, 128)


def test_unsupported_refused() -> None:
    with pytest.raises(
        UnsupportedModelError,
        match=r"^model='torch.nn.modules.container.Sequential' is invalid; accepted: .*"
        r"Supported families: .*deit3_",
    ):
        check_supported(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    # qk-norm ViTs are pruned inside their blocks (torch-pruning's whole-model trace fails on the per-head norms)
    assert check_supported(tiny_vit("vit_tiny_patch16_224", qk_norm=True)).name == "vit_blocks"
    torch.manual_seed(0)
    crossvit = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=10)
    with pytest.raises(
        UnsupportedModelError,
        match=r"^model='timm.models.crossvit.CrossVit' is invalid; accepted: .*"
        r"unsupported: two branches",
    ):
        prune(crossvit, PruningSpec(), torch.randn(1, 3, 240, 240))
    b0 = timm.create_model("efficientvit_b0", pretrained=False, num_classes=10)
    assert check_supported(b0, PruningSpec(global_pruning=True)).name == "efficientvit_mit"
    with pytest.raises(
        UnsupportedModelError,
        match=r"^prune_heads=True is invalid; accepted: "
        r"prune_heads=False for efficientvit_mit",
    ):
        check_supported(b0, PruningSpec(prune_heads=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientvit_b0", "efficientvit_m0"])
def test_efficientvit(name: str) -> None:
    torch.manual_seed(0)
    kw = {"img_size": 64} if name == "efficientvit_m0" else {}
    dense = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    model = copy.deepcopy(dense)
    data = batches(n=1, size=64, bs=2)
    result = prune(
        model,
        PruningSpec(ratio=0.5, importance="taylor", calibration_batches=1),
        data[0][0],
        calibration=data,
    )
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    # every coupled width halves, except the cascaded-attention qkv layers: half their key dims (q and k rows) go,
    # their value rows stay (the cascade adds each head's values to the next head's input slice)
    kd = 16  # efficientvit_m0's key dim
    for layer, (before, after) in result.layer_widths.items():
        assert after == (before - kd if ".qkvs." in layer else before // 2), layer
    replay = copy.deepcopy(dense)
    apply_structure(replay, result.structure)
    assert_same_state(model, replay)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(data[0][0])).all()
    train_step(model, *data[0])
