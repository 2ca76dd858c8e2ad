"""AOTInductor packages (``.pt2``): compiled for this x86 CPU, verified in their own runtime, int8 really int8."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqv_lightning.export import export_artifacts, load_artifact
from pqv_lightning.export.aoti import compile_package, kernel_counts
from pqv_lightning.utils.checks import InvalidArgumentError


@pytest.fixture(scope="module")
def batches(digit_tensors) -> list:
    x, y = digit_tensors["x_heldout"][:128], digit_tensors["y_heldout"][:128]
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 128, 64)]


@pytest.fixture(scope="module")
def packages(trained_tiny_vit, batches, digit_tensors, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("aoti")
    calibration = [digit_tensors["x_train"][i : i + 32] for i in range(0, 128, 32)]
    records = export_artifacts(
        trained_tiny_vit, out, ["aoti"], batches[0][0][:1], batches, calibration=calibration,
        aoti_precisions=["fp32", "int8"],
    )  # fmt: skip
    return out, records


@pytest.mark.slow
def test_fp32_and_int8_packages_verify_against_the_eager_model(packages) -> None:
    _, records = packages
    by_name = {r.name: r for r in records}
    assert set(by_name) == {"aoti-fp32", "aoti-int8"}
    for record in records:
        assert record.status == "ok", record.reason
        assert record.format == "aoti" and record.backend == "x86" and Path(record.path).suffix == ".pt2"
        assert record.extra["vec_isa"] and record.extra["kernels"]
    assert by_name["aoti-fp32"].max_abs_logit_diff < 1e-3
    assert by_name["aoti-fp32"].extra["int8_kernels"] == 0
    # the int8 file calls oneDNN's quantized linear kernel for every linear layer (2 blocks x 4 + head) and the
    # quantized patch convolution, not fp32 matrix multiplications of dequantized weights
    int8 = by_name["aoti-int8"]
    assert (
        int8.extra["kernels"].get("_qlinear_pointwise_tensor", 0)
        + int8.extra["kernels"].get("_qlinear_pointwise_binary_tensor", 0)
        == 9
    ), int8.extra["kernels"]
    assert "addmm" not in int8.extra["kernels"]
    assert int8.top1_agreement >= 0.97 and int8.extra["float_layers"] == []


@pytest.mark.slow
def test_a_package_runs_in_a_process_without_the_training_code(packages, batches) -> None:
    out, records = packages
    path = next(r.path for r in records if r.name == "aoti-int8")
    x = batches[0][0][:1]
    torch.save(x, out / "x.pt")
    code = (
        "import sys, torch\n"
        "from torch._inductor import aoti_load_package\n"
        f"y = aoti_load_package({path!r})(torch.load({str(out / 'x.pt')!r}, weights_only=True))\n"
        "assert 'pqv_lightning' not in sys.modules and 'timm' not in sys.modules\n"
        "print(int(y.argmax()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = int(load_artifact(path, "aoti").predict(x).argmax())
    assert int(result.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow
def test_an_int8_package_without_int8_kernels_fails(trained_tiny_vit, digit_tensors, tmp_path, monkeypatch) -> None:
    # Without freezing Inductor folds the dequantized weights into fp32 matmuls (pytorch/ao#4566): that file is
    # not an int8 file, and saying so is the point of inspecting the package.
    import torch._inductor

    real = torch._inductor.aoti_compile_and_package

    def without_freezing(exported, package_path, inductor_configs=None):
        return real(exported, package_path=package_path, inductor_configs={"freezing": False})

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", without_freezing)
    x = digit_tensors["x_train"][:1]
    with pytest.raises(RuntimeError, match="calls no quantized kernels"):
        compile_package(trained_tiny_vit, x, tmp_path / "m.pt2", "int8", [digit_tensors["x_train"][:32]])
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_bad_arguments_are_refused_before_compiling(trained_tiny_vit, digit_tensors, tmp_path) -> None:
    x = digit_tensors["x_train"][:1]
    with pytest.raises(InvalidArgumentError, match="precision='int4' is invalid; accepted: fp32, int8"):
        compile_package(trained_tiny_vit, x, tmp_path / "m.pt2", "int4")
    with pytest.raises(InvalidArgumentError, match="calibration"):
        compile_package(trained_tiny_vit, x, tmp_path / "m.pt2", "int8", None)
    with pytest.raises(InvalidArgumentError, match="aoti_precisions"):
        export_artifacts(trained_tiny_vit, tmp_path, ["aoti"], x, [(x, torch.tensor([0]))], aoti_precisions=["bf16"])
    with pytest.raises(InvalidArgumentError, match="aoti int8 need calibration"):
        export_artifacts(trained_tiny_vit, tmp_path, ["aoti"], x, [(x, torch.tensor([0]))])
    assert not list(tmp_path.glob("*.pt2"))


def test_kernel_counts_reads_the_generated_wrapper(tmp_path) -> None:
    import zipfile

    path = tmp_path / "p.pt2"
    with zipfile.ZipFile(path, "w") as package:
        package.writestr(
            "m/data/aotinductor/model/x.wrapper.cpp",
            "aoti_torch_cpu__qlinear_pointwise_tensor(a); aoti_torch_cpu_addmm_out(b); "
            "aoti_torch_cpu__qlinear_pointwise_tensor(c);",
        )
        package.writestr("m/data/aotinductor/model/x.kernel.cpp", "aoti_torch_cpu_addmm_out(ignored);")
    assert kernel_counts(path) == {"_qlinear_pointwise_tensor": 2, "addmm": 1}
