"""OpenVINO IR (``.xml`` + ``.bin``) run by the OpenVINO CPU plugin: the runtime x86 edge devices deploy.

``fp32`` is the model converted by ``openvino.convert_model`` at the export shape; ``int8`` is that model quantized
by NNCF's post-training quantization (``nncf.quantize`` with the transformer model type: per-channel symmetric
weights, activations calibrated on images, the ops OpenVINO runs better in float kept in float), which OpenVINO runs
with its int8 (VNNI / AMX) kernels. Both are verified and timed with ``INFERENCE_PRECISION_HINT=f32``, so that the
non-quantized parts compute what the eager model computes on any CPU (OpenVINO otherwise picks bf16 on CPUs with
AMX or AVX512-BF16: faster there, and not what was verified).

An optional format: it needs the ``openvino`` extra (``pip install pqv-lightning[openvino]``: openvino and nncf);
asked for without it, it is refused before any work. Running a file imports openvino and numpy only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqv_lightning.export.formats import LoadedArtifact
from pqv_lightning.utils.checks import invalid

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pqv_lightning.export.writer import ArtifactWriter, ExportJob

__all__ = ["check_request", "convert", "load", "prepare_runtime", "random_input", "write"]

log = logging.getLogger(__name__)


def check_request(precisions: Sequence[str], options: dict[str, Any], name_of: Callable[[str], str]) -> None:
    """Refuse OpenVINO files where the optional packages are missing (the format protocol), before any work."""
    needed = ["openvino", *(["nncf"] if "int8" in precisions else [])]
    missing = [package for package in needed if importlib.util.find_spec(package) is None]
    if missing:
        raise invalid(
            "artifacts['openvino']",
            list(precisions),
            f"none here: {', '.join(missing)} is not installed (install "
            "the extra: pip install 'pqv-lightning[openvino]')",
        )


# --------------------------------------------------------------------------- write


def convert(model: nn.Module, example_input: Tensor) -> Any:
    """The OpenVINO model of ``model`` (eval mode, no gradients) at the static shape of ``example_input``."""
    import openvino as ov
    import torch

    with torch.no_grad():
        return ov.convert_model(model.eval(), example_input=example_input, input=[tuple(example_input.shape)])


def _quantize(ov_model: Any, calibration: Sequence[Tensor], shape: Sequence[int]) -> Any:
    """NNCF post-training INT8 of an OpenVINO model, calibrated on ``calibration`` at the export ``shape``."""
    import nncf
    import torch

    images = torch.cat([batch.detach().float().cpu() for batch in calibration]) if calibration else torch.empty(0)
    count = int(shape[0])
    inputs = [images[i : i + count].numpy() for i in range(0, len(images) - count + 1, count)]
    if not inputs:
        raise ValueError(f"calibration has fewer than {count} images (the export batch size)")
    return nncf.quantize(
        ov_model, nncf.Dataset(inputs), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(inputs) * count
    )


def _save(ov_model: Any, path: Path) -> None:
    """Write ``path`` (``.xml``) and its ``.bin`` atomically: both into a temp folder beside them, then moved into
    place, the weights first, so that an ``.xml`` is only ever visible beside its own weights."""
    import openvino as ov

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as work:
        tmp = Path(work) / path.name
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)


def write(writer: ArtifactWriter, model: nn.Module, job: ExportJob) -> None:
    """Write and verify one IR per precision of ``job`` (the format protocol)."""
    converted: dict[str, Any] = {}  # the fp32 conversion, shared by both files

    def build(path: Path, extra: dict, precision: str) -> None:
        import openvino as ov

        from pqv_lightning.tokens import token_summary

        if "fp32" not in converted:
            converted["fp32"] = convert(model, writer.example_input)
        ov_model = converted["fp32"]
        if precision == "int8":
            ov_model = _quantize(ov_model, job.calibration or [], writer.example_input.shape)
        _save(ov_model, path)
        extra.update(openvino=ov.__version__, inference_precision="f32")
        summary = token_summary(model, writer.input_shape[-2:])
        if summary is not None:
            extra["tokens"] = summary

    for precision in job.artifacts.get("openvino", ()):
        writer.produce(
            f"openvino-{precision}",
            "openvino",
            precision,
            "openvino-cpu",
            f"{precision}.xml",
            lambda path, extra, precision=precision: build(path, extra, precision),
            lambda path: load(str(path), "openvino", None, None, False).predict,
        )


# --------------------------------------------------------------------------- run


def load(path: str, kind: str, threads: int | None, engine: str | None, ort_spinning: bool) -> LoadedArtifact:
    """An IR compiled for the CPU plugin in f32 with ``threads`` inference threads (``None``: the plugin's
    default); ``engine`` and ``ort_spinning`` do not apply. Runs numpy arrays."""
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(path, "CPU", config)
    output = compiled.output(0)

    def run(x: Any) -> Any:
        return compiled([x])[output]

    def bind(x: Any) -> Callable[[], Any]:
        request = compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(x))
        return request.infer

    return LoadedArtifact(kind, run, bind, takes_numpy=True)


def prepare_runtime(threads: int | None) -> None:
    """Import OpenVINO and start its CPU plugin (threads are set per compiled model)."""
    import openvino as ov

    ov.Core().get_property("CPU", "FULL_DEVICE_NAME")


def random_input(shape: list[int]) -> Any:
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
