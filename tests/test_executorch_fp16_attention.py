"""fp16 attention in the ``.pte``: the products and softmax in fp16, the casts inside the one XNNPACK delegate."""

from __future__ import annotations

import pytest
import timm
import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

from pqv_lightning.export import export_pte, prepare_for_xnnpack, run_pte
from pqv_lightning.export.xnnpack_casts import float_cast_partitioner
from pqv_lightning.export.xnnpack_rewrites import low_precision_attention_count
from pqv_lightning.pipeline import ExportConfig

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 10}


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()


def _bmm_dtypes(model: torch.nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    graph = torch.export.export(model, (x,)).graph
    return [n.meta["val"].dtype for n in graph.nodes if n.op == "call_function" and "bmm" in str(n.target)]


def test_prepared_fp16_attention_runs_both_products_in_fp16_and_stays_close(vit) -> None:
    x = torch.randn(2, 3, 32, 32)
    half = prepare_for_xnnpack(vit, attention="fp16")
    assert low_precision_attention_count(half) == 2
    assert low_precision_attention_count(prepare_for_xnnpack(vit)) == 0
    assert _bmm_dtypes(half, x[:1]) == [torch.float16] * 4
    assert _bmm_dtypes(prepare_for_xnnpack(vit), x[:1]) == [torch.float32] * 4
    with torch.no_grad():
        reference, out = vit(x), half(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, reference)  # the products really were rounded to fp16
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("precision", ["int8_dynamic", "int4"])  # fp32: the MobileExport test below
def test_fp16_attention_pte_is_one_delegate_and_matches_its_eager_model(vit, precision: str) -> None:
    x = torch.randn(1, 3, 32, 32)
    result = export_pte(vit, x, precision, attention="fp16")
    assert (result.outside_ops, result.num_delegates, result.attention) == ({}, 1, "fp16")
    out = run_pte(result.buffer, x)
    with torch.no_grad():
        eager = prepare_for_xnnpack(vit, attention="fp16")(x)
    torch.testing.assert_close(out, eager, atol=0.3, rtol=0)  # quantization error on top of fp16


def test_the_stock_partitioner_leaves_the_casts_outside(vit) -> None:
    """Why ``xnnpack_casts`` exists: with ExecuTorch's own partitioner each cast splits the program."""
    from executorch.backends.xnnpack.utils.configs import get_transform_passes
    from executorch.exir import to_edge_transform_and_lower

    from pqv_lightning.export.executorch import _count_lowered
    from pqv_lightning.export.xnnpack_rewrites import StaticReshapePass

    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(prepare_for_xnnpack(vit, attention="fp16"), (x,))
    counts = {}
    for name, partitioner in (("stock", XnnpackPartitioner()), ("ours", float_cast_partitioner())):
        passes = get_transform_passes([StaticReshapePass()])
        edge = to_edge_transform_and_lower(exported, transform_passes=passes, partitioner=[partitioner])
        _, delegates, outside = _count_lowered(edge.exported_program().graph_module)
        counts[name] = (delegates, outside)
    assert counts["stock"][1] == {"_to_dim_order_copy.default": 8}  # 3 in and 1 out per block
    assert counts["stock"][0] > 1
    assert counts["ours"] == (1, {})


def test_bad_attention_requests_are_refused(vit) -> None:
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"attention.*'bf16'.*fp32.*fp16"):
        prepare_for_xnnpack(vit, attention="bf16")
    with pytest.raises(ValueError, match=r"attention.*prepare=False"):
        export_pte(vit, x, attention="fp16", prepare=False)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    with pytest.raises(ValueError, match=r"no timm Attention block"):
        export_pte(mlp, x, attention="fp16")
    with pytest.raises(ValueError, match=r"executorch_attention.*'half'"):
        ExportConfig(executorch_attention="half")
    with pytest.raises(ValueError, match=r"executorch_attention.*'fp16'.*'fp32' with executorch precision 'int8'"):
        ExportConfig(executorch_precisions=("fp32", "int8", "int4"), executorch_attention="fp16")
    assert ExportConfig(formats=("onnx",), executorch_attention="fp16").options["executorch"]["attention"] == "fp16"
    with pytest.raises(ValueError, match=r"attention.*static int8"):
        export_pte(vit, x, "int8", calibration=[x], attention="fp16")
    config = ExportConfig({"executorch": ["int8_dynamic"]}, {"executorch": {"attention": "fp16"}})
    config.check_model(vit)  # what MobileExport runs in setup, before training
    with pytest.raises(ValueError, match=r"\['attention'\]='fp16'.*Sequential: it has no timm Attention"):
        config.check_model(mlp)


def test_mobile_export_writes_fp16_attention_and_the_report_says_so(tmp_path, trained_classifier) -> None:
    import json

    import lightning.pytorch as pl

    from pqv_lightning.callbacks import MobileExport, TradeoffReport
    from pqv_lightning.datamodules import DigitsDataModule

    export = MobileExport(formats=["executorch"], executorch_precisions=["fp32", "int8_dynamic"],
                          executorch_attention="fp16", output_dir=tmp_path / "artifacts", val_batches=2)  # fmt: skip
    report = TradeoffReport(output_dir=tmp_path / "report", warmup=1, runs=3, batch=None, memory=False, profile=None)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=2, accelerator="cpu", logger=False,
                         callbacks=[export, report], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(trained_classifier(), DigitsDataModule(img_size=16, in_chans=1, batch_size=32, augment=False))
    manifest = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert manifest["meta"]["options"]["executorch"]["attention"] == "fp16"
    records = {r["name"]: r for r in manifest["artifacts"]}
    assert sorted(records) == ["executorch-fp32", "executorch-int8_dynamic"]
    for record in records.values():
        assert record["status"] == "ok" and record["extra"]["attention"] == "fp16"
        assert record["extra"]["outside_ops"] == {}
        check = record["extra"]["attention_eager"]
        assert check["top1_agreement"] >= 0.98 and 0 < check["max_abs_logit_diff"] < 0.5
    assert records["executorch-fp32"]["top1_agreement"] >= 0.98
    text = (tmp_path / "report" / "report.md").read_text()
    assert "executorch-fp32, executorch-int8_dynamic compute their attention products in fp16" in text
