"""``QuantizationAwareTraining``: fake quantization from epoch K after pruning, converted at train end and exported
like every other variant; on a foreign module; with distillation; under 2-process CPU DDP through the CLI, with
resume mid-QAT; and its bad inputs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.export import MobileExport
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.qat import QAT_KEY, QuantizationAwareTraining
from pqv_lightning.callbacks.quantization import Quantization
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.quantization import quantization_state


class Probe(pl.Callback):
    """At the first batch of every epoch (listed after the QAT callback: after its swap, before the step): the
    model's type and width, whether the optimizers hold exactly the module's parameters and a state (moments) for
    each; and whether a validation of the fake-quantized model moved its observers."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.validation_moved: list[bool] = []
        self._before: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx != 0:
            return
        model = next(m for name, m in pl_module.named_children() if name in ("model", "net"))
        held = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
        state = trainer.optimizers[0].state
        self.epochs.append({
            "epoch": trainer.current_epoch,
            "graph": isinstance(model, torch.fx.GraphModule),
            "qkv_out": model.get_parameter("blocks.0.attn.qkv.weight").shape[0],
            "optimizer_is_model": sorted(map(id, held)) == sorted(id(p) for p in pl_module.parameters()),
            "moments": all(len(state.get(p, {})) > 0 for p in held),
        })  # fmt: skip

    def on_validation_start(self, trainer, pl_module) -> None:
        self._before = {k: v.clone() for k, v in quantization_state(pl_module.model).items()}

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._before:
            after = quantization_state(pl_module.model)
            ranges = [k for k in self._before if k.endswith(("min_val", "max_val"))]
            self.validation_moved.append(any(not torch.equal(after[k], self._before[k]) for k in ranges))


def _trainer(callbacks, tmp_path, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_train_batches=6,
        **kwargs,
    )  # fmt: skip


def _digits() -> DigitsDataModule:
    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32, augment=False)


@pytest.fixture(scope="module")
def int8_fit(tmp_path_factory, trained_classifier):
    """Pruning at epoch 1, QAT from epoch 1 listed first, distillation, then the fit-end chain with the .pte."""
    tmp = tmp_path_factory.mktemp("qat")
    probe = Probe()
    qat = QuantizationAwareTraining("int8_pt2e:xnnpack", start_epoch=1)
    quant = Quantization(["int8_pt2e:xnnpack"], calibration_batches=2)
    export = MobileExport(["executorch", "torchscript"], executorch_precisions=["int8"], calibration_batches=2)
    callbacks = [qat, probe, KnowledgeDistillation(), StructuredPruning(ratio=0.25, at_epoch=1), quant, export]
    module = trained_classifier()
    trainer = _trainer(callbacks, tmp, epochs=3)
    trainer.fit(module, _digits())
    return trainer, module, qat, quant, export, probe


def test_qat_starts_after_pruning_whatever_the_order_and_keeps_the_optimizers(int8_fit):
    _, module, qat, _, _, probe = int8_fit
    assert [(e["epoch"], e["graph"], e["qkv_out"]) for e in probe.epochs] == [(0, False, 192), (1, True, 144),
                                                                               (2, True, 144)]  # fmt: skip
    assert all(e["optimizer_is_model"] for e in probe.epochs)
    assert len(probe.validation_moved) == 2 and not any(probe.validation_moved)  # observers frozen in validation
    assert qat.active and isinstance(module.model, torch.fx.GraphModule)


def test_qat_variant_is_evaluated_exported_and_verified_against_itself(int8_fit):
    _, _, qat, quant, export, _ = int8_fit
    variant = qat.result.variant
    assert variant.name == "qat_int8_pt2e_xnnpack" and variant.origin == "qat"
    assert "dequantize_per_channel" in variant.module.code  # a converted Q/DQ graph, not fake quantization
    # the float model of the chain holds the QAT-trained weights, in the pruned timm model
    float_model = qat.result.float_model
    assert isinstance(float_model, nn.Module) and float_model.blocks[0].attn.qkv.out_features == 144
    names = [r.name for r in quant.results]
    assert names == ["int8_pt2e_xnnpack", "qat_int8_pt2e_xnnpack"], names
    qat_result = quant.results[1]
    assert qat_result.error is None and qat_result.top1 > 0.7 and qat_result.top1_agreement > 0.9
    records = {r.name: r for r in export.records}
    pte = records["executorch-qat_int8_pt2e_xnnpack"]
    assert pte.status == "ok", pte.reason
    assert pte.top1_agreement >= 0.97 and pte.extra["reference"] == "qat_int8_pt2e_xnnpack eager"
    assert pte.extra["outside_ops"] == {}  # fully delegated
    assert records["torchscript-qat_int8_pt2e_xnnpack"].status == "skipped"
    assert records["executorch-int8"].status == "ok"  # the post-training file of the same model, as before


def test_int4_qat_on_a_foreign_module_with_float_layers(tmp_path, tiny_vit_kwargs):
    class Foreign(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs)

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return F.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    qat = QuantizationAwareTraining("int4_weight", start_epoch=1, float_layers=["head"], model_attribute="net")
    export = MobileExport(["executorch"], executorch_precisions=[], model_attribute="net")
    probe = Probe()
    trainer = _trainer([qat, probe, export], tmp_path, epochs=2, limit_val_batches=2)
    trainer.fit(Foreign(), _digits())
    # SGD's momentum of every parameter went on into the fake-quantized model (it had one before the swap)
    assert [(e["epoch"], e["optimizer_is_model"], e["moments"]) for e in probe.epochs] == [
        (0, True, False),
        (1, True, True),
    ]
    variant = qat.result.variant
    assert variant.float_layers == ["head"] and variant.name == "qat_int4_weight_xnnpack"
    fc1 = variant.module.blocks[0].mlp.fc1.weight
    assert type(fc1).__name__ == "IntxUnpackedToInt8Tensor" and int(fc1.qdata.abs().max()) <= 8
    assert type(variant.module.head.weight) is nn.Parameter  # kept in float
    (record,) = export.records
    assert record.name == "executorch-qat_int4_weight_xnnpack" and record.status == "ok", record.reason
    # verified in the ExecuTorch runtime against the converted QAT model, not the float one
    assert record.top1_agreement >= 0.97 and record.extra["reference"] == "qat_int4_weight_xnnpack eager"
    assert record.extra["float_layers"] == ["head"]


class _Before(pl.Callback):
    """Listed before the QAT callback: the float model's logits on the first QAT batch, before any smoothing."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.images, self.logits, self.weight = epoch, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            self.images = batch[0].detach().clone()
            pl_module.model.eval()
            with torch.no_grad():
                self.logits = pl_module.model(self.images)
            pl_module.model.train()
            self.weight = pl_module.model.blocks[0].attn.proj.weight.detach().clone()


def test_qat_can_start_from_the_smoothed_model(tmp_path, trained_classifier):
    before = _Before(epoch=1)
    qat = QuantizationAwareTraining("int8_pt2e:xnnpack", start_epoch=1, smoothing=True)
    _trainer([before, qat], tmp_path, epochs=2).fit(trained_classifier(), _digits())
    assert qat.state_dict()["smoothing"] is True and qat.result is not None
    template = qat._template.eval()  # the float model the fake quantization started from
    assert not torch.allclose(template.blocks[0].attn.proj.weight, before.weight)  # smoothed
    with torch.no_grad():  # ... and the same function as the model just before
        after = template(before.images)
    assert torch.allclose(after, before.logits, atol=1e-4 * float(before.logits.abs().max()))
    with pytest.raises(ValueError, match="smoothing"):
        QuantizationAwareTraining(smoothing="yes")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target": "int8_dynamic:x86"},
            r"target='int8_dynamic:x86' is invalid; accepted: a target quantization-aware "
            r"training fake-quantizes: int8_pt2e:xnnpack, int4_weight:xnnpack",
        ),
        ({"target": "fp16"}, r"target='fp16' is invalid; accepted: a target quantization-aware training"),
        ({"target": "int8_pt2e:x86"}, r"target='int8_pt2e:x86' is invalid"),
        ({"start_epoch": -1}, r"start_epoch=-1 is invalid; accepted: an int >= 0"),
        ({"float_layers": [""]}, r"float_layers\[0\]='' is invalid"),
        ({"group_size": 0}, r"group_size=0 is invalid; accepted: an int >= 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


class _Steps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    ("callbacks", "epochs", "message"),
    [
        ([QuantizationAwareTraining(start_epoch=3)], 3, r"start_epoch=3 is invalid; accepted: an int in \[0, 2\]: "
         r"with max_epochs=3 no epoch would train through fake quantization"),
        ([QuantizationAwareTraining(start_epoch=4)], 3, r"start_epoch=4 is invalid; accepted: an int in \[0, 2\]"),
        ([QuantizationAwareTraining(start_epoch=1), StructuredPruning(at_epoch=2)], 3,
         r"start_epoch=1 is invalid; accepted: an int >= 2: StructuredPruning changes the model at epoch 2"),
        ([QuantizationAwareTraining(float_layers=["blocks.0.mlp.fc3"])], 3,
         r"float_layers\[0\]='blocks.0.mlp.fc3' is invalid; .*close to it: .*blocks.0.mlp.fc1"),
        ([Quantization(["int8_dynamic:x86"], float_layers=["blocks.7"])], 1, r"float_layers\[0\]='blocks.7' is"),
        ([Quantization(["int8_dynamic:x86"], max_float_layers=9, granularity="block")], 1,
         r"max_float_layers=9 is invalid; accepted: an int in \[1, 2\]"),
        ([MobileExport(["onnx"], float_layers=["blocks.0.mlp.fc9"])], 1, r"float_layers\[0\]='blocks.0.mlp.fc9'"),
    ],
)  # fmt: skip
def test_bad_settings_fail_in_setup_before_training(tmp_path, tiny_classifier, callbacks, epochs, message):
    steps = _Steps()
    with pytest.raises(ValueError, match=message):
        _trainer([*callbacks, steps], tmp_path, epochs=epochs).fit(tiny_classifier, _digits())
    assert steps.steps == 0


# --------------------------------------------------------------------------- 2-process CPU DDP through the CLI
PROBE = '''
import torch
from ddp_probe import save_rank_report, state_of
from lightning.pytorch import Callback

from pqv_lightning.quantization import quantization_state


class QATProbe(Callback):
    """At fit end (after the QAT callback's train-end sync): every tensor of the module, and its quantization state."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.graph_from = None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.graph_from is None and isinstance(pl_module.model, torch.fx.GraphModule):
            self.graph_from = trainer.current_epoch

    def on_fit_end(self, trainer, pl_module):
        report = {
            "state": state_of(pl_module),
            "quantization": {k: v.detach().cpu().clone() for k, v in quantization_state(pl_module.model).items()},
            "global_step": trainer.global_step,
            "graph_from": self.graph_from,
        }
        save_rank_report(trainer, report, self.out_dir)
'''

QAT_CALLBACKS = """\
- class_path: pqv_lightning.callbacks.qat.QuantizationAwareTraining
  init_args: {target: int8_pt2e:xnnpack, start_epoch: 1}
- class_path: pqv_lightning.callbacks.StructuredPruning
  init_args: {ratio: 0.25, at_epoch: 1}
- class_path: pqv_lightning.callbacks.KnowledgeDistillation
"""


def _ddp_config(out: Path, ckpt: Path, max_epochs: int) -> str:
    return textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 2
          strategy: ddp
          max_epochs: {max_epochs}
          limit_train_batches: 3
          limit_val_batches: 1
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: qat_probe.QATProbe
              init_args: {{out_dir: "{out}"}}
        """) + textwrap.indent(QAT_CALLBACKS, "    ") + textwrap.dedent(f"""\
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: "{ckpt}", filename: "e{{epoch}}", save_top_k: -1,
                           auto_insert_metric_name: false, save_on_train_epoch_end: false}}
        model:
          class_path: pqv_lightning.ViTClassifier
          init_args:
            model_name: vit_tiny_patch16_224
            num_classes: 10
            model_kwargs: {{img_size: 16, patch_size: 4, in_chans: 1, depth: 2, embed_dim: 64, num_heads: 4}}
            warmup_epochs: 0
        data:
          class_path: pqv_lightning.datamodules.DigitsDataModule
          init_args: {{img_size: 16, in_chans: 1, batch_size: 16, augment: false}}
        """)  # fmt: skip


def _run(cli, tmp_path: Path, name: str, max_epochs: int, ckpt_path: Path | None = None) -> list[dict]:
    (tmp_path / "qat_probe.py").write_text(PROBE)
    (tmp_path / "ddp_probe.py").write_text((Path(__file__).parent / "ddp_probe.py").read_text())
    out = tmp_path / name
    out.mkdir()
    config = tmp_path / f"{name}.yaml"
    config.write_text(_ddp_config(out, tmp_path / "ckpt", max_epochs))
    args = ["fit", "--config", str(config)] + ([f"--ckpt_path={ckpt_path}"] if ckpt_path else [])
    done = cli(args, cwd=tmp_path, timeout=400, extra_env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _assert_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


@pytest.mark.slow
def test_ddp_qat_identical_on_both_ranks_and_resume_mid_qat_gives_the_same_weights(tmp_path, cli):
    ranks = _run(cli, tmp_path, "fit", max_epochs=3)
    assert ranks[0]["graph_from"] == ranks[1]["graph_from"] == 1  # fake-quantized from epoch 1, after pruning
    _assert_equal(ranks[0]["state"], ranks[1]["state"])  # weights, observer ranges, scales: all of it
    quantized = ranks[0]["quantization"]
    assert any(k.endswith(".scale") for k in quantized) and len(quantized) > 100
    _assert_equal(quantized, ranks[1]["quantization"])
    assert ranks[0]["state"]["model.blocks.0.attn.qkv.weight"].shape == (144, 48)  # pruned, then QAT

    checkpoint = torch.load(tmp_path / "ckpt" / "e1.ckpt", weights_only=True)  # plain data and tensors only
    assert checkpoint[QAT_KEY] == {"target": "int8_pt2e:xnnpack", "float_layers": [], "group_size": 32,
                                   "example_shape": [16, 1, 16, 16], "start_epoch": 1}  # fmt: skip
    assert any(".activation_post_process_" in k for k in checkpoint["state_dict"])

    resumed = _run(cli, tmp_path, "resume", max_epochs=3, ckpt_path=tmp_path / "ckpt" / "e1.ckpt")
    assert resumed[0]["global_step"] == ranks[0]["global_step"]
    _assert_equal(resumed[0]["state"], resumed[1]["state"])
    _assert_equal(resumed[0]["state"], ranks[0]["state"])  # the same final weights as the uninterrupted run


@pytest.mark.slow
def test_the_qat_recipe_runs_through_the_cli(tmp_path, cli):
    """configs/qat_digits.yaml, shortened (2 of its 6 blocks, 3 epochs of 4 batches, pruning at 1, QAT from 2, the
    QAT model's .pte only, a quick report)."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "qat_digits.yaml").read_text())
    recipe["trainer"].update(max_epochs=3, limit_train_batches=4, limit_val_batches=2)
    recipe["model"]["init_args"]["model_kwargs"]["depth"] = 2  # every export and sensitivity pass is per block
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    by_name = {c["class_path"].rsplit(".", 1)[-1]: c for c in recipe["trainer"]["callbacks"]}
    by_name["StructuredPruning"]["init_args"].update(at_epoch=1, calibration_batches=2)
    by_name["QuantizationAwareTraining"]["init_args"]["start_epoch"] = 2
    by_name["Quantization"]["init_args"].update(calibration_batches=2, eval_batches=2)
    # the QAT model's own .pte only (the float and PTQ files are the export tests' concern)
    by_name["MobileExport"]["init_args"].update(artifacts={"executorch": []}, val_batches=2, calibration_batches=2)
    by_name["TradeoffReport"]["init_args"].update(warmup=1, runs=3, batch=None, memory=False, val_batches=2)
    config = tmp_path / "qat.yaml"
    config.write_text(yaml.safe_dump(recipe))
    done = cli(["fit", "--config", str(config)], tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    run = tmp_path / "runs" / "qat_digits" / "version_0"
    manifest = json.loads((run / "artifacts" / "manifest.json").read_text())
    records = {r["name"]: r for r in manifest["artifacts"]}
    assert records["executorch-qat_int8_pt2e_xnnpack"]["status"] == "ok"
    assert records["executorch-qat_int8_pt2e_xnnpack"]["top1_agreement"] >= 0.97
    assert "qat_int8_pt2e_xnnpack" in manifest["meta"]["quantization"]["variants"]
    report = (run / "report" / "report.md").read_text()
    assert "qat_int8_pt2e_xnnpack eager" in report and "## Quantization sensitivity" in report
    assert "Quantization aware training: int8_pt2e:xnnpack from epoch 2" in report
