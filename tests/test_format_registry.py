"""The export-format registry: one setting for the files, derived tables, a format as one module, the keys of 0.1."""

from __future__ import annotations

import re
import textwrap
import warnings

import pytest
import torch

from pqv_lightning.export import formats as registry
from pqv_lightning.export.formats import (
    ExportFormat,
    float_layer_files,
    format_of,
    get_format,
    list_formats,
    register_format,
    resolve_artifacts,
    resolve_options,
)
from pqv_lightning.utils.checks import InvalidArgumentError


def test_artifacts_in_every_form_resolve_to_format_precisions_in_registry_order() -> None:
    defaults = resolve_artifacts(None)
    assert list(defaults) == [f.name for f in list_formats(default_only=True)]
    assert defaults["executorch"] == get_format("executorch").default_precisions
    assert resolve_artifacts(["onnx", "executorch"]) == {
        "executorch": get_format("executorch").default_precisions,
        "onnx": get_format("onnx").default_precisions,
    }
    assert resolve_artifacts({"onnx": ["int8", "fp32"], "executorch": None, "aoti": []}) == {
        "executorch": ("fp32", "int8", "int4"),
        "onnx": ("fp32", "int8"),  # the format's order, whatever the order given
        "aoti": (),
    }
    assert resolve_artifacts("onnx") == {"onnx": ("fp32", "int8")}


@pytest.mark.parametrize(
    ("artifacts", "message"),
    [
        ({"tflite": ["fp32"]}, r"artifacts key='tflite' is invalid; accepted: torchscript, lite, executorch, onnx"),
        ({"onnx": ["int3"]}, r"artifacts\['onnx'\]\[0\]='int3' is invalid; accepted: fp32, int8, int8_qdq"),
        ({}, r"artifacts=\{\} is invalid; accepted: a mapping of format to precisions"),
        (["onnx", "pte"], r"artifacts\[1\]='pte' is invalid"),
    ],
)
def test_a_bad_artifact_request_names_the_value_and_what_is_accepted(artifacts, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        resolve_artifacts(artifacts)


def test_options_are_filled_with_defaults_checked_and_cross_checked_by_the_format() -> None:
    requested = resolve_artifacts({"executorch": ["fp32", "int8_dynamic"], "onnx": ["int8"]})
    options = resolve_options({"executorch": {"attention": "fp16"}}, requested)
    assert options == {
        "executorch": {"attention": "fp16"},
        "onnx": {"optimize": True, "per_channel": True, "reduce_range": "auto"},
    }
    with pytest.raises(InvalidArgumentError, match=r"options\['executorch'\]\['attention'\]='bf16' is invalid"):
        resolve_options({"executorch": {"attention": "bf16"}}, requested)
    with pytest.raises(InvalidArgumentError, match=r"options\['onnx'\]='threads' is invalid; accepted: an option of"):
        resolve_options({"onnx": {"threads": 2}}, requested)
    with pytest.raises(InvalidArgumentError, match=r"options\['onnx'\]\['optimize'\]=1 is invalid"):
        resolve_options({"onnx": {"optimize": 1}}, requested)
    static = resolve_artifacts({"executorch": ["int8"]})
    with pytest.raises(InvalidArgumentError, match=r"attention'\]='fp16' is invalid; accepted: 'fp32' with executorch"):
        resolve_options({"executorch": {"attention": "fp16"}}, static)


def test_the_tables_of_the_package_are_derived_from_the_registry() -> None:
    from pqv_lightning.export.widths import kernel_multiple
    from pqv_lightning.latency_search import latency_artifacts
    from pqv_lightning.measure import kinds

    names = [f.name for f in list_formats()]
    assert set(kinds()) == {"eager", *names}
    for fmt in list_formats():
        assert format_of(f"model{fmt.suffix}") == fmt.name
        assert kernel_multiple(f"{fmt.name}-fp32") == fmt.kernel_multiple
        assert {f"{fmt.name}-{p}" for p in fmt.latency_precisions} <= set(latency_artifacts())
        assert {f"{fmt.name}-{p}" for p in fmt.float_layers} <= set(float_layer_files())
    assert "torchscript-quantized" not in latency_artifacts()  # made by the quantization stage, not the format
    with pytest.raises(InvalidArgumentError, match=r"path='model.tflite' is invalid; accepted: a file whose suffix"):
        format_of("model.tflite")


def test_registration_refuses_a_taken_name_or_suffix_and_precisions_it_does_not_have() -> None:
    base = {"module": "m", "precisions": ("fp32",), "default_precisions": ("fp32",), "description": "d"}
    with pytest.raises(InvalidArgumentError, match=r"fmt.name='onnx' is invalid"):
        register_format(ExportFormat(name="onnx", suffix=".x1", **base))
    with pytest.raises(InvalidArgumentError, match=r"fmt.suffix='.pte' is invalid.*executorch has it"):
        register_format(ExportFormat(name="other", suffix=".pte", **base))
    with pytest.raises(InvalidArgumentError, match="precisions"):
        register_format(ExportFormat(name="other", suffix=".x2", **{**base, "calibrated": ("int8",)}))
    assert "other" not in registry.format_names()


#: A whole export format in one module: it writes a traced TorchScript file under its own suffix.
PLUGIN = textwrap.dedent(
    """
    import torch

    from pqv_lightning.export.eager import module_artifact, random_tensor, set_torch_threads


    def write(writer, model, job):
        for precision in job.artifacts.get("traced", ()):
            def build(path, extra):
                torch.jit.save(torch.jit.trace(model, writer.example_input), str(path))
                extra["plugin"] = True

            def verifier(path):
                return load(str(path), "traced", None, None, False).predict

            writer.produce(f"traced-{precision}", "traced", precision, "cpu", f"{precision}.traced", build, verifier)


    def load(path, kind, threads, engine, ort_spinning):
        prepare_runtime(threads)
        return module_artifact(torch.jit.load(path).eval(), kind)


    def prepare_runtime(threads):
        set_torch_threads(threads)


    def random_input(shape):
        return random_tensor(shape)
    """
)


@pytest.fixture
def traced_format(tmp_path, monkeypatch):
    """A format registered from a module of its own, removed from the registry afterwards."""
    (tmp_path / "traced_format.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    fmt = register_format(
        ExportFormat(
            name="traced",
            suffix=".traced",
            module="traced_format",
            precisions=("fp32",),
            default_precisions=("fp32",),
            description="a traced TorchScript file",
            default=False,
            kernel_multiple=16,
        )
    )
    yield fmt
    registry._REGISTRY.pop("traced")


def test_a_format_is_one_module_and_one_registration(traced_format, trained_tiny_vit, digit_tensors, tmp_path) -> None:
    from pqv_lightning.export import export_artifacts, load_artifact
    from pqv_lightning.export.widths import kernel_multiple
    from pqv_lightning.latency_search import LatencyTarget
    from pqv_lightning.measure import make_runner
    from pqv_lightning.pipeline import ExportConfig

    x, y = digit_tensors["x_heldout"][:16], digit_tensors["y_heldout"][:16]
    (record,) = export_artifacts(trained_tiny_vit, tmp_path / "out", {"traced": None}, x[:1], [(x, y)])
    assert record.status == "ok" and record.top1_agreement == 1.0 and record.extra["plugin"] is True
    assert record.path.endswith("model_fp32.traced") and format_of(record.path) == "traced"
    assert torch.allclose(load_artifact(record.path, "traced").predict(x[:1]), trained_tiny_vit(x[:1]), atol=1e-5)
    assert make_runner(record.path, "traced", x[:1], threads=1).predict(x[:1]).shape == (1, 10)
    assert LatencyTarget(5.0, "traced-fp32").format == "traced" and kernel_multiple("traced-fp32") == 16
    assert ExportConfig(artifacts={"traced": ["fp32"]}).artifacts == {"traced": ("fp32",)}
    assert "traced" not in resolve_artifacts(None)  # not a default format


def test_the_keys_of_0_1_still_work_with_a_warning_that_names_the_new_form() -> None:
    from pqv_lightning.callbacks import MobileExport
    from pqv_lightning.pipeline import ExportConfig

    with pytest.warns(FutureWarning, match=r"deprecated.*write artifacts=\{'executorch': \['fp32', 'int8_dynamic'\]"):
        old = MobileExport(
            formats=["executorch", "onnx"], executorch_precisions=["fp32", "int8_dynamic"], executorch_attention="fp16"
        )
    new = MobileExport(
        artifacts={"executorch": ["fp32", "int8_dynamic"], "onnx": None}, options={"executorch": {"attention": "fp16"}}
    )
    assert old.config == new.config
    with pytest.warns(FutureWarning, match="onnx_optimize"):
        config = ExportConfig(formats=["onnx"], onnx_optimize=False)
    assert config.artifacts == {"onnx": ("fp32", "int8")} and config.options["onnx"]["optimize"] is False
    with pytest.raises(InvalidArgumentError, match=r"artifacts=.* is invalid; accepted: alone"):
        ExportConfig(artifacts={"onnx": ["fp32"]}, onnx_precisions=["int8"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'tflite_precisions'"):
        ExportConfig(tflite_precisions=["fp32"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new form warns of nothing
        MobileExport(artifacts={"onnx": ["fp32"]})


def test_old_yaml_keys_parse_through_the_cli_and_pqv_export_takes_the_old_flags(tmp_path, cli_config) -> None:
    from pqv_lightning.apps import export_checkpoint
    from pqv_lightning.cli import main

    config = cli_config(
        tmp_path,
        extra_callbacks="""
                - class_path: pqv_lightning.callbacks.MobileExport
                  init_args: {formats: [onnx], onnx_precisions: [fp32]}""",
    )
    with pytest.warns(FutureWarning, match=r"write artifacts=\{'onnx': \['fp32'\]\}"):
        cli = main(["--config", str(config)], run=False)
    (export,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "MobileExport"]
    assert export.config.artifacts == {"onnx": ("fp32",)}

    missing = str(tmp_path / "missing.ckpt")
    with pytest.warns(FutureWarning, match="executorch_precisions"), pytest.raises(SystemExit) as stop:
        export_checkpoint.main(["--checkpoint", missing, "--formats", "executorch", "--executorch-precisions", "fp32"])
    assert stop.value.code == 2  # the checkpoint is missing: refused after the flags were read
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(SystemExit):
            export_checkpoint.main(
                ["--checkpoint", missing, "--artifacts", "executorch=fp32,int8_dynamic", "onnx",
                 "--option", "executorch.attention=fp16", "--option", "onnx.optimize=false"]
            )  # fmt: skip


def test_pqv_export_flags_are_checked_against_the_registry(tmp_path, capsys) -> None:
    from pqv_lightning.apps import export_checkpoint

    missing = str(tmp_path / "missing.ckpt")
    for flags, message in [
        (["--artifacts", "tflite"], "artifacts key='tflite' is invalid"),
        (["--artifacts", "onnx=int3"], r"artifacts\['onnx'\]\[0\]='int3' is invalid"),
        (["--option", "onnx.optimize=maybe"], "--option onnx.optimize='maybe' is invalid; accepted: True, False"),
        (["--option", "attention=fp16"], "--option='attention=fp16' is invalid; accepted: FORMAT.OPTION=VALUE"),
    ]:
        with pytest.raises(SystemExit) as stop:
            export_checkpoint.main(["--checkpoint", missing, *flags])
        assert stop.value.code == 2
        assert re.search(message, capsys.readouterr().err), flags


def test_sweep_export_sections_take_both_forms(tmp_path) -> None:
    from pqv_lightning.apps.sweep_spec import SweepSpec, validate_spec

    base = tmp_path / "recipe.yaml"
    base.write_text("model: {}\n")
    new = validate_spec(SweepSpec(str(base), str(tmp_path / "out"), export={"artifacts": {"onnx": ["fp32"]}}))
    assert new.export_config(tmp_path).artifacts == {"onnx": ("fp32",)}
    with pytest.warns(FutureWarning, match="onnx_precisions"):
        old = validate_spec(
            SweepSpec(str(base), str(tmp_path / "o"), export={"formats": ["onnx"], "onnx_precisions": ["fp32"]})
        )
    with pytest.warns(FutureWarning):
        assert old.export_config(tmp_path).artifacts == {"onnx": ("fp32",)}
    with pytest.raises(InvalidArgumentError, match=r"export\['tflite'\]"):
        validate_spec(SweepSpec(str(base), str(tmp_path / "x"), export={"tflite": ["fp32"]}))
