"""Token-reducing models exported to every format with the reduction inside the file, each file verified in its
runtime against the eager reducing model; the ``.pte`` delegates everything but the matching to XNNPACK."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import timm
import torch

from pqv_lightning.export import export_artifacts, export_pte, prepare_for_xnnpack, run_pte
from pqv_lightning.export.onnxruntime_rewrites import prepare_for_onnxruntime
from pqv_lightning.tokens import (
    TokenReduction,
    apply_token_reduction,
    reduction_form_of,
    remove_token_reduction,
    set_reduction_form,
    token_summary,
    tokens_per_block,
)
from pqv_lightning.utils.checks import InvalidArgumentError

#: 32 px images, 8 px patches: 16 patch tokens, 2 blocks, 32 wide.
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
#: name -> (timm model, extra timm kwargs, reduction)
MODELS = {
    "vit_merge": ("vit_tiny_patch16_224", {}, TokenReduction("merge", r=4)),
    "deit_distilled_merge": ("deit_tiny_distilled_patch16_224", {}, TokenReduction("merge", r=4)),
    "deit_distilled_prune": ("deit_tiny_distilled_patch16_224", {}, TokenReduction("prune", r=3)),
    "vit_avg_merge": ("vit_tiny_patch16_224", {"global_pool": "avg", "reg_tokens": 2}, TokenReduction("merge", r=5)),
}
#: What a ``.pte`` of each method leaves to the portable kernels: the matching (the similarity's max and full sort or
#: the class-attention ranking, the slot tables' gathers and scatters, the reduction matrix's scatter and fills).
MATCHING = {
    "merge": {"full.default", "gather.default", "max.dim", "scatter.src", "scatter.value", "slice_copy.Tensor",
              "topk.default"},
    "prune": {"full.default", "gather.default", "scatter.src", "scatter.value", "topk.default"},
}  # fmt: skip


def _timm(name: str, **kwargs) -> torch.nn.Module:
    timm_name, extra, _ = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(timm_name, pretrained=False, **{**TINY, **extra, **kwargs}).eval()


def _reduced(name: str) -> torch.nn.Module:
    return apply_token_reduction(_timm(name), MODELS[name][2])


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The reducing model fitted (with its reduction) to a synthetic 10-class task, so that its logits have the
    margins quantized files are verified on; and held-out images with their labels."""
    gen = torch.Generator().manual_seed(1)
    templates = torch.randn(10, 3, 32, 32, generator=gen)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=gen)
        return templates[labels] + 0.7 * torch.randn(n, 3, 32, 32, generator=gen), labels

    model = _reduced(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        images, labels = batch(32)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, labels = batch(16)
    return model.eval(), images, labels


# --------------------------------------------------------------------------- the matrix form
@pytest.mark.parametrize("name", list(MODELS))
def test_matrix_form_is_the_gather_form(name):
    model = _reduced(name)
    matrix = set_reduction_form(copy.deepcopy(model), "matrix")
    x = _images(3)
    with torch.no_grad():
        tokens, size = model.forward_tokens(x)
        matrix_tokens, matrix_size = matrix.forward_tokens(x)
        torch.testing.assert_close(matrix_tokens, tokens, rtol=1e-5, atol=1e-5)
        assert torch.equal(matrix_size, size)
        torch.testing.assert_close(matrix(x), model(x), rtol=1e-5, atol=1e-5)
    assert matrix_tokens.shape[1] == tokens_per_block(model)[-1]
    assert reduction_form_of(model) == "gather" and reduction_form_of(matrix) == "matrix"


def test_reduction_form_is_checked_and_removed_with_the_reduction():
    with pytest.raises(InvalidArgumentError, match=r"form='scatter' is invalid; accepted: gather, matrix"):
        set_reduction_form(_reduced("vit_merge"), "scatter")
    with pytest.raises(InvalidArgumentError, match=r"model='VisionTransformer' is invalid; accepted: a model with"):
        set_reduction_form(_timm("vit_merge"), "matrix")
    model = remove_token_reduction(set_reduction_form(_reduced("vit_merge"), "matrix"))
    assert reduction_form_of(model) is None and not hasattr(model, "pqv_token_form")


def test_token_summary_is_what_the_records_hold():
    assert token_summary(_timm("vit_merge")) is None
    summary = token_summary(_reduced("deit_distilled_merge"), (32, 32))
    assert summary == {"method": "merge", "r": 4, "tokens_per_block": [18, 14, 10]}
    assert token_summary(_reduced("deit_distilled_prune"), (16, 16))["tokens_per_block"] == [6, 4, 3]


@pytest.mark.parametrize("name", list(MODELS))
def test_export_rewrites_keep_the_reducing_function(name):
    model = _reduced(name)
    x = _images(2)
    onnxruntime_form, counts = prepare_for_onnxruntime(model)
    xnnpack_form = prepare_for_xnnpack(model)
    assert counts["attention"] == 2 and reduction_form_of(xnnpack_form) == "matrix"
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(onnxruntime_form(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xnnpack_form(x), expected, rtol=1e-5, atol=1e-5)
    assert reduction_form_of(model) == "gather"  # the model given is left as it was


# --------------------------------------------------------------------------- ExecuTorch
def _check_pte(name: str, batch: int, extra_outside: set[str] = frozenset()) -> None:
    model, plain = _reduced(name), _timm(name)
    example = _images(batch, seed=3)
    result = export_pte(model, example)
    assert set(result.outside_ops) == MATCHING[MODELS[name][2].method] | extra_outside
    for seed in (4, 5):
        x = _images(batch, seed=seed)
        got = run_pte(result.buffer, x)
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
            assert (got - plain(x)).abs().max() > 1e-3  # the file reduces tokens, like the model it is checked on


def test_fp32_pte_delegates_all_but_the_matching():
    _check_pte("deit_distilled_merge", batch=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_distilled_prune", "vit_avg_merge"])  # vit_merge: as deit_distilled_merge
def test_fp32_pte_delegates_all_but_the_matching_of_every_model(name):
    _check_pte(name, batch=1)


@pytest.mark.slow
def test_batch_two_pte_leaves_only_integer_expands_besides_the_matching():
    # index tables broadcast over the batch stay integer expands (they were cats of one view per channel)
    _check_pte("deit_distilled_merge", batch=2, extra_outside={"expand_copy.default"})


# --------------------------------------------------------------------------- every format
def _export(name: str, tmp_path, artifacts: dict) -> tuple[list, dict]:
    model, images, labels = _trained(name)
    records = export_artifacts(model, tmp_path, artifacts, images[:1], [(images, labels)], calibration=[images])
    for rec in records:
        assert rec.status == "ok", (rec.name, rec.reason)
        assert rec.extra["tokens"] == token_summary(model, (32, 32)), rec.name
    return records, {rec.name: rec for rec in records}


@pytest.mark.slow
# one model of each method: vit_merge differs from deit_distilled_merge only by its prefix (the .pte and
# matrix-form tests cover it); the pruning variant's files differ in the matching, which the .pte test covers, and
# in what onnxruntime fuses (test_onnx_int8_fuses_every_block_of_the_pruning_model)
@pytest.mark.parametrize("name", ["deit_distilled_merge"])
def test_every_format_exports_and_verifies_the_reducing_model(name, tmp_path):
    artifacts = {
        "executorch": ["fp32", "int8", "int8_dynamic", "int4"],
        "onnx": ["fp32", "int8", "int8_qdq"],
        "torchscript": ["fp32"],
        "lite": ["fp32"],
    }
    records, by_name = _export(name, tmp_path, artifacts)
    assert len(records) == 9
    method = MODELS[name][2].method
    for precision in artifacts["executorch"]:
        assert set(by_name[f"executorch-{precision}"].extra["outside_ops"]) == MATCHING[method], precision
    for rec in records:
        if rec.precision == "fp32":
            assert rec.max_abs_logit_diff < 1e-4, rec.name
    # onnxruntime fuses the attention of every block without the proportional-attention bias (EViT has none;
    # ToMe's first block has no merged token yet)
    fusion = by_name["onnx-int8"].extra["ort_attention_fusion"]
    assert fusion["blocks"] == 2 and fusion["fused"] == (2 if method == "prune" else 1)
    assert by_name["onnx-int8"].extra["onnxruntime_optimized"] is True
    assert by_name["torchscript-fp32"].extra["torchscript"] == "trace"
    assert by_name["lite-fp32"].extra["torchscript"] == "trace"


@pytest.mark.slow
def test_onnx_int8_fuses_every_block_of_the_pruning_model(tmp_path):
    _, by_name = _export("deit_distilled_prune", tmp_path, {"onnx": ["fp32", "int8"]})
    assert by_name["onnx-fp32"].max_abs_logit_diff < 1e-4
    assert by_name["onnx-int8"].extra["ort_attention_fusion"] == {"blocks": 2, "fused": 2}


@pytest.mark.slow
def test_aoti_packages_of_the_reducing_model(tmp_path):
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:
        pytest.skip(f"no C++ compiler for AOTInductor: {e}")
    _, by_name = _export("deit_distilled_merge", tmp_path, {"aoti": ["fp32", "int8"]})
    assert by_name["aoti-fp32"].max_abs_logit_diff < 1e-4
    assert by_name["aoti-int8"].extra["int8_kernels"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="the openvino extra is not installed",
)
@pytest.mark.parametrize("name", ["deit_distilled_merge", "deit_distilled_prune"])
def test_openvino_irs_of_the_reducing_model(name, tmp_path):
    _, by_name = _export(name, tmp_path, {"openvino": ["fp32", "int8"]})
    assert by_name["openvino-fp32"].max_abs_logit_diff < 1e-4
