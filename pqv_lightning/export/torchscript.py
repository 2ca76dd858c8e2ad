"""TorchScript (``.pt``) and the lite interpreter (``.ptl``): how their files are written and run.

Both are deprecated upstream (ExecuTorch is their successor) but are PQV-Mobile's formats; their deprecation
warnings are silenced with one log line. torch.ao INT8 variants are scripted without their ``EngineScoped``
wrapper (a Python context manager), under the engine their weights were packed for; the runtime then needs
that engine too.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pqv_lightning.export.eager import module_artifact, random_tensor, set_torch_threads
from pqv_lightning.export.formats import LoadedArtifact
from pqv_lightning.quantization import LEGACY_ENGINES, quantized_engine
from pqv_lightning.quantization.methods import list_methods
from pqv_lightning.utils.checks import check_choice
from pqv_lightning.utils.deprecations import jit_deprecations_silenced
from pqv_lightning.utils.errors import error_summary, last_line
from pqv_lightning.utils.io import atomic_write

if TYPE_CHECKING:
    from pqv_lightning.export.writer import ArtifactWriter, ExportJob
    from pqv_lightning.quantization import QuantizedModel

__all__ = [
    "load",
    "optimize_for_mobile_status",
    "prepare_runtime",
    "random_input",
    "to_torchscript",
    "torchscript_variants",
    "write",
]

log = logging.getLogger(__name__)


@functools.cache
def optimize_for_mobile_status() -> str | None:
    """``None`` if ``optimize_for_mobile`` works in this torch build, else why not (probed, logged once)."""
    reason: str | None = None
    is_enabled = getattr(torch._C, "_is_xnnpack_enabled", None)
    if is_enabled is not None and not is_enabled():
        reason = "unavailable: this torch build has no XNNPACK (USE_XNNPACK=0); optimize_for_mobile needs it"
    else:
        try:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            optimize_for_mobile(torch.jit.script(nn.Linear(2, 2).eval()))
        except Exception as e:
            reason = f"unavailable: {type(e).__name__}: {last_line(e)}"
    if reason is not None:
        log.warning("optimize_for_mobile %s; lite (.ptl) files are written without it", reason)
    return reason


def to_torchscript(
    module: nn.Module, example_input: Tensor, extra: dict, use_script: bool = True
) -> torch.jit.ScriptModule:
    """``torch.jit.script``; if the module does not script, ``torch.jit.trace`` at the export shape."""
    if use_script:
        try:
            scripted = torch.jit.script(module)
            extra["torchscript"] = "script"
            return scripted.eval()
        except Exception as e:
            extra["script_failed"] = error_summary(e, limit=600)
    extra["torchscript"] = "trace"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed on purpose
        return torch.jit.trace(module, example_input, check_trace=False).eval()


def torchscript_variants(
    model: nn.Module, quantized: Sequence[QuantizedModel]
) -> Iterator[tuple[str, str, str, nn.Module | None, str | None, str | None]]:
    """(tag, precision, backend, module to script, quantized engine, skip reason) per variant."""
    yield "fp32", "fp32", "cpu", model, None, None
    for q in quantized:
        t = q.target
        if t.spec.torchscript:
            module = q.unwrapped() if t.engine else q.module
            yield t.name, t.precision, t.backend, module, t.engine, None
        else:
            reason = (
                f"quantization method {t.method!r} is not TorchScript-able (TorchScript takes "
                f"{', '.join(m.name for m in list_methods() if m.torchscript)}); its deployment formats are the "
                "ones that quantize the float model themselves"
            )
            yield t.name, t.precision, t.backend, None, None, reason


class _Scripted:
    """One module scripted once (traced if scripting fails), written as ``.pt`` and/or ``.ptl`` under its
    engine."""

    def __init__(self, module: nn.Module, example_input: Tensor, engine: str | None) -> None:
        self.module, self.example_input, self.engine = module, example_input, engine
        self._scripted: torch.jit.ScriptModule | None = None
        self._extra: dict = {}

    def script(self, extra: dict) -> torch.jit.ScriptModule:
        if self._scripted is None:
            from pqv_lightning.tokens import token_summary

            tokens = token_summary(self.module, self.example_input.shape[-2:])
            if tokens is not None:  # Python over shapes and settings: traced at the export shape, not scripted
                self._extra["tokens"] = tokens
                self._extra["script_skipped"] = (
                    "token reduction: the token counts per block are Python ints of the input shape (traced at the "
                    "export shape)"
                )
            self._scripted = to_torchscript(self.module, self.example_input, self._extra, use_script=tokens is None)
        extra.update(self._extra)
        return self._scripted

    def write_pt(self, path: Path, extra: dict) -> None:
        with quantized_engine(self.engine):
            sm = self.script(extra)
            atomic_write(path, lambda tmp: torch.jit.save(sm, str(tmp)))

    def write_ptl(self, path: Path, extra: dict) -> None:
        from torch.jit.mobile import _load_for_lite_interpreter

        with quantized_engine(self.engine):
            sm = self.script(extra)
            status = optimize_for_mobile_status()
            extra["optimize_for_mobile"] = "applied" if status is None else status

            def mobile(sm: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
                if status is None:
                    from torch.utils.mobile_optimizer import optimize_for_mobile

                    try:
                        return optimize_for_mobile(sm)
                    except Exception as e:
                        extra["optimize_for_mobile"] = f"failed, written without it: {error_summary(e, limit=600)}"
                return sm

            def write(tmp: Path) -> None:
                mobile(sm)._save_for_lite_interpreter(str(tmp))
                if extra["torchscript"] == "trace":
                    return
                # The lite runtime cannot load some scripted modules (timm's enum attributes).
                try:
                    _load_for_lite_interpreter(str(tmp), map_location="cpu")
                except Exception as e:
                    extra["torchscript"] = "trace"
                    reason = error_summary(e, limit=600)
                    extra["script_failed"] = f"lite interpreter cannot load the scripted module: {reason}"
                    traced = to_torchscript(self.module, self.example_input, {}, use_script=False)
                    mobile(traced)._save_for_lite_interpreter(str(tmp))

            atomic_write(path, write)


def write(writer: ArtifactWriter, model: nn.Module, job: ExportJob) -> None:
    """Write and verify the ``torchscript`` and ``lite`` files of ``job`` (the format protocol, for both formats):
    ``"fp32"`` is the float model, ``"quantized"`` each TorchScript-able variant of ``job.quantized`` (the others are
    recorded as skipped, with the reason). A variant is scripted once for both files."""
    wanted = {fmt: job.artifacts.get(fmt, ()) for fmt in ("torchscript", "lite")}
    eager_modules = {"fp32": model} | {q.target.name: q.module for q in job.quantized}
    with jit_deprecations_silenced():
        for tag, precision, backend, module, engine, skip in torchscript_variants(model, job.quantized):
            asked = [
                fmt for fmt, precisions in wanted.items() if ("fp32" if tag == "fp32" else "quantized") in precisions
            ]
            if module is None:
                for fmt in asked:
                    writer.record(f"{fmt}-{tag}", fmt, precision, backend, status="skipped", reason=skip)
                continue
            scripted = _Scripted(module, writer.example_input, engine)
            eager_variant = None if tag == "fp32" else eager_modules[tag]
            for fmt, suffix, build in (("torchscript", "pt", scripted.write_pt), ("lite", "ptl", scripted.write_ptl)):
                if fmt in asked:
                    writer.produce(
                        f"{fmt}-{tag}",
                        fmt,
                        precision,
                        backend,
                        f"{tag}.{suffix}",
                        build,
                        functools.partial(_verifier, kind=fmt, engine=engine),
                        eager_variant=eager_variant,
                    )


def _verifier(path: Path, kind: str, engine: str | None):
    return load(str(path), kind, None, engine, False).predict


def load(path: str, kind: str, threads: int | None, engine: str | None, ort_spinning: bool) -> LoadedArtifact:
    """A ``.pt`` (``kind="torchscript"``) or ``.ptl`` (``"lite"``) file, loaded and run under ``engine``.
    ``ort_spinning`` does not apply."""
    check_choice("engine", engine, LEGACY_ENGINES, allow_none=True)
    prepare_runtime(threads)
    with quantized_engine(engine), jit_deprecations_silenced():
        if kind == "lite":
            from torch.jit.mobile import _load_for_lite_interpreter

            module = _load_for_lite_interpreter(path, map_location="cpu")
        else:
            module = torch.jit.load(path, map_location="cpu").eval()
    return module_artifact(module, kind, engine)


def prepare_runtime(threads: int | None) -> None:
    """Fix torch's intra-op threads (``None``: leave them)."""
    set_torch_threads(threads)


def random_input(shape: list[int]) -> Tensor:
    return random_tensor(shape)
