"""One loader for every format, and the fresh-process probe built on it: each process imports only its runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pqv_lightning.export import ArtifactRecord, format_of, load_artifact
from pqv_lightning.export.probe import PEAK_TAG, READY_TAG, TIMING_TAG, memory_command, read_peak, serve_command

# Runs the probe as ``-m`` does and prints, at exit, every module the process imported.
_REPORTING_MODULES = (
    "import atexit, json, runpy, sys\n"
    "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
    "sys.argv = ['probe', *sys.argv[1:]]\n"
    "runpy.run_module('pqv_lightning.export.probe', run_name='__main__', alter_sys=True)\n"
)


def _reporting_modules(command: list[str]) -> list[str]:
    assert command[1:3] == ["-m", "pqv_lightning.export.probe"]
    return [command[0], "-c", _REPORTING_MODULES, *command[3:]]


def _imported_modules(stderr: str) -> set[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``y = x @ w + b`` for ``x`` of shape [1, 8], built with onnx alone."""
    from onnx import TensorProto, helper, save_model

    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal((8, 4)).astype(np.float32).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w, b],
    )
    path = tmp_path_factory.mktemp("onnx") / "linear.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def test_package_names_load_on_first_use() -> None:
    code = (
        "import sys, pqv_lightning, pqv_lightning.export as ex\n"
        "assert not {'torch', 'lightning'} & set(sys.modules), sorted({'torch', 'lightning'} & set(sys.modules))\n"
        "assert set(ex.__all__) <= set(dir(ex)) and 'ViTClassifier' in dir(pqv_lightning)\n"
        "assert ex.FORMATS == ('torchscript', 'lite', 'executorch', 'onnx', 'aoti', 'openvino')\n"
        "assert 'torch' not in sys.modules\n"
        "from pqv_lightning import ViTClassifier, __version__\n"
        "assert ViTClassifier.__name__ == 'ViTClassifier' and __version__\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_onnx_memory_probe_never_imports_torch(onnx_file: Path) -> None:
    for path in (str(onnx_file), None):  # the file, then the baseline
        command = _reporting_modules(memory_command("onnx", path, [1, 8], threads=1, runs=2))
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert read_peak(result.stdout) > 10 * 2**20
        imported = _imported_modules(result.stderr)
        assert "onnxruntime" in imported
        assert not {m for m in imported if m.split(".")[0] in ("torch", "lightning", "timm")}


def test_onnx_serve_probe_times_batches_without_torch(onnx_file: Path) -> None:
    command = _reporting_modules(serve_command("onnx", str(onnx_file), [1, 8], threads=1, warmup=2))
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout.readline().strip() == READY_TAG
        proc.stdin.write("3\n")
        proc.stdin.flush()
        tag, payload = proc.stdout.readline().split(" ", 1)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    timing = json.loads(payload)
    assert tag == TIMING_TAG and len(timing["wall_ms"]) == len(timing["cpu_ms"]) == 3
    assert all(ms > 0 for ms in timing["wall_ms"])
    assert "torch" not in _imported_modules(stderr)


def test_load_artifact_runs_onnx_in_its_own_array_type(onnx_file: Path) -> None:
    loaded = load_artifact(onnx_file, "onnx", threads=1)
    x = np.ones((1, 8), dtype=np.float32)
    assert loaded.takes_numpy and loaded.run(x).shape == (1, 4)
    assert loaded.bind(x)()[0].shape == (1, 4)
    torch.testing.assert_close(loaded.predict(torch.ones(1, 8)), torch.from_numpy(loaded.run(x)))


def test_load_artifact_refuses_what_it_cannot_load(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind='tflite' is invalid; accepted: torchscript, lite, executorch, onnx"):
        load_artifact(onnx_file, "tflite")
    with pytest.raises(ValueError, match="engine='x86' is invalid; accepted: None for onnx files"):
        load_artifact(onnx_file, "onnx", engine="x86")
    with pytest.raises(ValueError, match="threads=0 is invalid"):
        load_artifact(onnx_file, "onnx", threads=0)
    with pytest.raises(FileNotFoundError, match=r"missing\.pte"):
        load_artifact(tmp_path / "missing.pte", "executorch")
    suffixes = (".pt", ".ptl", ".pte", ".onnx")
    assert [format_of(f"m{s}") for s in suffixes] == ["torchscript", "lite", "executorch", "onnx"]
    with pytest.raises(ValueError, match=r"path='m\.tflite' is invalid; accepted: a file whose suffix"):
        format_of("m.tflite")


def test_executorch_probe_does_not_import_the_exporter(tmp_path: Path) -> None:
    """The runtime of a .pte is the extension module alone: executorch.exir (seconds, tens of MiB) stays out."""
    from pqv_lightning.export import export_pte

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "linear.pte"
    path.write_bytes(export_pte(model, torch.randn(1, 8)).buffer)
    loaded = load_artifact(path, "executorch", threads=1)
    x = torch.randn(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x), model(x), atol=1e-5, rtol=1e-5)
    result = subprocess.run(
        _reporting_modules(memory_command("executorch", str(path), [1, 8])), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(PEAK_TAG)
    imported = _imported_modules(result.stderr)
    assert "executorch.extension.pybindings._C" in imported
    assert not {m for m in imported if m.startswith(("executorch.exir", "executorch.runtime", "lightning"))}


def test_eager_serve_probe_loads_a_state_dict(tmp_path: Path, tiny_vit_kwargs: dict) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    command = serve_command(
        "eager", str(tmp_path / "state.pt"), [1, 1, 16, 16], model="vit_tiny_patch16_224",
        model_kwargs={"num_classes": 10, **tiny_vit_kwargs},
    )  # fmt: skip
    result = subprocess.run(command, input="2\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == READY_TAG and lines[1].startswith(TIMING_TAG)
    assert len(json.loads(lines[1].split(" ", 1)[1])["wall_ms"]) == 2


def test_record_names_the_engine_its_runtime_needs() -> None:
    def record(fmt: str, backend: str) -> ArtifactRecord:
        return ArtifactRecord("r", fmt, "int8", backend, None, None, None, [1, 3, 8, 8], "ok")

    assert record("torchscript", "x86").engine == "x86" and record("lite", "qnnpack").engine == "qnnpack"
    assert record("torchscript", "cpu").engine is None and record("onnx", "onnxruntime-cpu").engine is None
    assert record("executorch", "xnnpack").engine is None
