"""Export a vision model to mobile/edge formats and verify every file in its own runtime.

Formats: TorchScript (``.pt``), TorchScript lite interpreter (``.ptl``), ExecuTorch (``.pte``) and ONNX
(``.onnx``). A file only counts as a result once it has been loaded back in its own runtime
(``torch.jit.load``, ``_load_for_lite_interpreter``, the ExecuTorch runtime, ``onnxruntime``) and its
outputs on every validation image have been compared with the eager float model. A file that fails the
check is kept on disk but marked ``"failed"`` in its record, with the reason.

Batch size: every artifact is exported for the fixed input shape of ``example_input`` (recorded per
artifact). Verification cuts each validation batch into pieces of that batch size; a short last piece is
padded by repeating its last image and the padded rows are dropped from the results (a ViT in eval mode
treats samples independently, so padding does not change the real rows).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import math
import os
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pqv_lightning._io import atomic_write, atomic_write_bytes, write_json
from pqv_lightning._warnings import deprecations_silenced
from pqv_lightning.quantization import quantized_engine

if TYPE_CHECKING:
    from pqv_lightning.quantization import QuantizedModel

__all__ = [
    "EXECUTORCH_PRECISIONS",
    "FORMATS",
    "ONNX_PRECISIONS",
    "TORCHSCRIPT_METHODS",
    "ArtifactRecord",
    "VerifyThresholds",
    "check_output_dir",
    "export_artifacts",
    "optimize_for_mobile_status",
    "prepare_for_onnxruntime",
    "validate_formats",
    "validate_precisions",
    "write_manifest",
]

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "lite", "executorch", "onnx")
# "int8": static pt2e (calibrated); "int8_dynamic": pt2e dynamic activations; "int4": torchao int4
# weights (see executorch_lowering.export_pte).
EXECUTORCH_PRECISIONS = ("fp32", "int8", "int8_dynamic", "int4")
# "int8": onnxruntime dynamic quantization (no calibration) of the onnxruntime-optimized graph (see
# export_artifacts); "int8_qdq": static QDQ from calibration images.
ONNX_PRECISIONS = ("fp32", "int8", "int8_qdq")
# Quantization methods whose eager module TorchScript can take (torch.ao int8, half precision). pt2e graphs
# and torchao int4 tensor subclasses are not: their deployment formats are ExecuTorch and ONNX.
TORCHSCRIPT_METHODS = ("fp16", "int8_dynamic", "int8_static")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class VerifyThresholds:
    """Pass/fail limits for an exported artifact, measured against the eager float model.

    Full-precision artifacts must agree on every top-1 prediction and stay within ``fp32_max_abs_diff`` of
    the eager logits; reduced-precision ones (fp16, int8, int4) must agree on at least
    ``quantized_min_agreement``.
    """

    fp32_min_agreement: float = 1.0
    fp32_max_abs_diff: float = 1e-3
    quantized_min_agreement: float = 0.97

    def __post_init__(self) -> None:
        for name in ("fp32_min_agreement", "quantized_min_agreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must lie in [0, 1]")
        if not self.fp32_max_abs_diff > 0:
            raise ValueError(f"fp32_max_abs_diff={self.fp32_max_abs_diff!r} must be > 0")


@dataclass
class ArtifactRecord:
    """One exported file (one manifest row). ``status`` is ``"ok"``, ``"failed"`` or ``"skipped"``."""

    name: str
    format: str
    precision: str
    backend: str
    path: str | None
    size_bytes: int | None
    sha256: str | None
    input_shape: list[int]
    status: str
    reason: str | None = None
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    extra: dict = field(default_factory=dict)


def validate_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Return ``formats`` as a de-duplicated tuple, or raise naming the bad value and the accepted ones."""
    if isinstance(formats, str):
        formats = [formats]
    out: list[str] = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise ValueError(f"no export format given; accepted: {', '.join(FORMATS)}")
    return tuple(out)


def validate_precisions(values: Sequence[str], accepted: Sequence[str], what: str) -> tuple[str, ...]:
    """``values`` as a de-duplicated tuple, or raise naming the bad value and the accepted ones."""
    if isinstance(values, str):
        values = [values]
    for value in values:
        if value not in accepted:
            raise ValueError(f"Unknown {what} precision {value!r}; accepted: {', '.join(accepted)}.")
    return tuple(dict.fromkeys(values))


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable (by writing and removing a probe file)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export output dir {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".pqv-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"export output dir {str(out)!r} is not writable: {e}") from e
    return out


def _check_example_input(example_input: Any) -> None:
    if not isinstance(example_input, Tensor) or example_input.dim() != 4:
        got = (
            f"a {example_input.dim()}-D tensor of shape {list(example_input.shape)}"
            if isinstance(example_input, Tensor)
            else type(example_input).__name__
        )
        raise ValueError(f"example_input must be a 4-D image tensor [B, C, H, W]; got {got}")
    if not example_input.is_floating_point():
        raise ValueError(f"example_input must be a float tensor; got dtype {example_input.dtype}")


def _check_val_batches(val_batches: Sequence, example_input: Tensor) -> None:
    if len(val_batches) == 0:
        raise ValueError("val_batches is empty: every artifact must be verified on real validation images")
    for i, batch in enumerate(val_batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"val_batches[{i}] must be an (images, labels) pair; got {type(batch).__name__}")
        images, labels = batch
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1:] != example_input.shape[1:]:
            shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"val_batches[{i}] images must be [B, {', '.join(map(str, example_input.shape[1:]))}] "
                f"like example_input; got {shape}"
            )
        if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
            raise ValueError(f"val_batches[{i}] labels must be a [B] tensor matching its images")


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
            reason = f"unavailable: {type(e).__name__}: {_first_line(e)}"
    if reason is not None:
        log.warning("optimize_for_mobile %s; lite (.ptl) files are written without it", reason)
    return reason


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:300] if text else ""


def _error(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = " | ".join(lines[:3])
    return f"{type(e).__name__}: {msg[:600]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Piece:
    images: Tensor  # [B_export, C, H, W], padded
    n_real: int
    labels: Tensor
    ref_logits: Tensor


def _make_pieces(model: nn.Module, val_batches: Sequence, batch_size: int) -> list[_Piece]:
    pieces = []
    with torch.inference_mode():
        for images, labels in val_batches:
            for start in range(0, images.shape[0], batch_size):
                real = images[start : start + batch_size].float().contiguous()
                n = real.shape[0]
                if n < batch_size:
                    real = torch.cat([real, real[-1:].expand(batch_size - n, *real.shape[1:])]).contiguous()
                ref = model(real)[:n].float()
                pieces.append(_Piece(real, n, labels[start : start + batch_size], ref))
    return pieces


def _verify(
    run: Callable[[Tensor], Tensor],
    pieces: Sequence[_Piece],
    precision: str,
    thresholds: VerifyThresholds,
    eager_variant: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, float], str | None]:
    """Run ``run`` on every piece; return metrics, extra metrics and why it fails (None if it passes)."""
    agree = total = correct1 = correct5 = 0
    variant_agree = 0
    max_diff = 0.0
    for p in pieces:
        out = torch.as_tensor(run(p.images)).detach().float()[: p.n_real]
        if out.shape != p.ref_logits.shape:
            return {}, {}, f"runtime output shape {list(out.shape)} != eager {list(p.ref_logits.shape)}"
        if not torch.isfinite(out).all():
            return {}, {}, "runtime produced non-finite logits"
        max_diff = max(max_diff, (out - p.ref_logits).abs().max().item())
        pred = out.argmax(1)
        agree += (pred == p.ref_logits.argmax(1)).sum().item()
        correct1 += (pred == p.labels).sum().item()
        topk = out.topk(min(5, out.shape[1]), dim=1).indices
        correct5 += (topk == p.labels[:, None]).any(1).sum().item()
        total += p.n_real
        if eager_variant is not None:
            with torch.inference_mode():
                variant_pred = eager_variant(p.images)[: p.n_real].float().argmax(1)
            variant_agree += (pred == variant_pred).sum().item()
    metrics = {
        "top1_agreement": agree / total,
        "max_abs_logit_diff": max_diff,
        "val_top1": correct1 / total,
        "val_top5": correct5 / total,
    }
    extra = {"verified_images": total}
    if eager_variant is not None:
        extra["eager_variant_top1_agreement"] = variant_agree / total
    agreement = metrics["top1_agreement"]
    if precision == "fp32":
        if agreement < thresholds.fp32_min_agreement:
            return (
                metrics,
                extra,
                (f"top-1 agreement {agreement:.4f} < {thresholds.fp32_min_agreement} with the eager model"),
            )
        if max_diff > thresholds.fp32_max_abs_diff:
            return metrics, extra, f"max |logit diff| {max_diff:.3g} > {thresholds.fp32_max_abs_diff}"
    elif agreement < thresholds.quantized_min_agreement:
        limit = thresholds.quantized_min_agreement
        return metrics, extra, f"top-1 agreement {agreement:.4f} < {limit} with the eager float model"
    return metrics, extra, None


class _Exporter:
    """Shared state of one ``export_artifacts`` call."""

    def __init__(
        self,
        out_dir: Path,
        example_input: Tensor,
        pieces: list[_Piece],
        thresholds: VerifyThresholds,
        prefix: str,
    ) -> None:
        self.out_dir = out_dir
        self.example_input = example_input
        self.pieces = pieces
        self.thresholds = thresholds
        self.prefix = prefix
        self.input_shape = list(example_input.shape)
        self.records: list[ArtifactRecord] = []

    def record(self, name: str, fmt: str, precision: str, backend: str, **kw: Any) -> ArtifactRecord:
        rec = ArtifactRecord(
            name=name,
            format=fmt,
            precision=precision,
            backend=backend,
            path=kw.pop("path", None),
            size_bytes=None,
            sha256=None,
            input_shape=self.input_shape,
            status=kw.pop("status", "failed"),
            **kw,
        )
        self.records.append(rec)
        return rec

    def produce(
        self,
        name: str,
        fmt: str,
        precision: str,
        backend: str,
        filename: str,
        build: Callable[[Path, dict], None],
        load: Callable[[Path], Callable[[Tensor], Tensor]],
        eager_variant: Callable[[Tensor], Tensor] | None = None,
        extra: dict | None = None,
    ) -> ArtifactRecord:
        """Write one artifact with ``build(path, extra)``, load it with ``load`` and verify; never raises."""
        path = self.out_dir / f"{self.prefix}{filename}"
        rec = self.record(name, fmt, precision, backend, extra=dict(extra or {}))
        stage = "export"
        try:
            build(path, rec.extra)
            rec.path = str(path)
            rec.size_bytes = path.stat().st_size
            rec.sha256 = _sha256(path)
            stage = "load"
            run = load(path)
            stage = "verify"
            metrics, more, failure = _verify(run, self.pieces, precision, self.thresholds, eager_variant)
        except Exception as e:
            rec.reason = f"{stage} failed: {_error(e)}"
            rec.extra["traceback"] = traceback.format_exc(limit=-4)
            if stage == "export" and path.exists():  # a file left by an earlier run is not this model's
                path.unlink()
                rec.extra["removed_stale_file"] = path.name
            log.warning("%s: %s", name, rec.reason)
            return rec
        for key, value in metrics.items():
            setattr(rec, key, value)
        rec.extra.update(more)
        rec.status = "ok" if failure is None else "failed"
        rec.reason = None if failure is None else f"verification failed: {failure}"
        log.info(
            "%s -> %s: %s (agreement %.4f, max|diff| %.3g, top1 %.4f)",
            name,
            path.name,
            rec.status if failure is None else rec.reason,
            metrics.get("top1_agreement", math.nan),
            metrics.get("max_abs_logit_diff", math.nan),
            metrics.get("val_top1", math.nan),
        )
        return rec


# --------------------------------------------------------------------------- TorchScript and lite


def _to_torchscript(
    module: nn.Module, example_input: Tensor, extra: dict, use_script: bool = True
) -> torch.jit.ScriptModule:
    """``torch.jit.script``; if the module does not script, ``torch.jit.trace`` at the export shape."""
    if use_script:
        try:
            scripted = torch.jit.script(module)
            extra["torchscript"] = "script"
            return scripted.eval()
        except Exception as e:
            extra["script_failed"] = _error(e)
    extra["torchscript"] = "trace"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed on purpose
        return torch.jit.trace(module, example_input, check_trace=False).eval()


def _torchscript_variants(
    model: nn.Module, quantized: Sequence[QuantizedModel]
) -> Iterator[tuple[str, str, str, nn.Module | None, str | None, str | None]]:
    """(tag, precision, backend, module to script, quantized engine, skip reason) per variant.

    torch.ao int8 variants are scripted without their ``EngineScoped`` wrapper (a Python context manager),
    under the engine their weights were packed for; the runtime then needs that engine too.
    """
    yield "fp32", "fp32", "cpu", model, None, None
    for q in quantized:
        t = q.target
        if t.method in TORCHSCRIPT_METHODS:
            module = q.unwrapped() if t.engine else q.module
            yield t.name, t.precision, t.backend, module, t.engine, None
        else:
            yield (
                t.name,
                t.precision,
                t.backend,
                None,
                None,
                f"quantization method {t.method!r} is not TorchScript-able (TorchScript takes "
                f"{', '.join(TORCHSCRIPT_METHODS)}); its deployment formats are executorch and onnx",
            )


# TorchScript and the lite interpreter are deprecated in PyTorch; they are the PQV-Mobile formats we keep.
_JIT_DEPRECATIONS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (FutureWarning, r"Lite Interpreter is deprecated"),
    (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
)


def _export_torchscript_family(
    ex: _Exporter, model: nn.Module, formats: tuple[str, ...], quantized: Sequence[QuantizedModel]
) -> None:
    from torch.jit.mobile import _load_for_lite_interpreter

    wanted = [f for f in ("torchscript", "lite") if f in formats]
    eager_modules = {"fp32": model} | {q.target.name: q.module for q in quantized}
    for tag, precision, backend, module, engine_name, skip in _torchscript_variants(model, quantized):
        if module is None:
            for fmt in wanted:
                ex.record(f"{fmt}-{tag}", fmt, precision, backend, status="skipped", reason=skip)
            continue
        eager_variant = None if tag == "fp32" else eager_modules[tag]
        engine = functools.partial(quantized_engine, engine_name)
        script_extra: dict = {}
        scripted: list[torch.jit.ScriptModule] = []

        def script_once(
            extra: dict,
            module: nn.Module = module,
            script_extra: dict = script_extra,
            scripted: list = scripted,
        ) -> torch.jit.ScriptModule:
            if not scripted:
                scripted.append(_to_torchscript(module, ex.example_input, script_extra))
            extra.update(script_extra)
            return scripted[0]

        def wrap(run: Callable[[Tensor], Tensor], engine: Callable = engine) -> Callable[[Tensor], Tensor]:
            def call(x: Tensor) -> Tensor:
                with engine(), torch.inference_mode():
                    return run(x)

            return call

        if "torchscript" in formats:

            def build_pt(path: Path, extra: dict, script_once: Callable = script_once, engine=engine) -> None:
                with engine():
                    sm = script_once(extra)
                    atomic_write(path, lambda tmp: torch.jit.save(sm, str(tmp)))

            def load_pt(path: Path, wrap=wrap, engine=engine) -> Callable[[Tensor], Tensor]:
                with engine():
                    return wrap(torch.jit.load(str(path), map_location="cpu").eval())

            ex.produce(
                f"torchscript-{tag}", "torchscript", precision, backend, f"{tag}.pt", build_pt, load_pt,
                eager_variant=eager_variant,
            )  # fmt: skip

        if "lite" in formats:

            def build_ptl(
                path: Path, extra: dict, script_once: Callable = script_once, engine=engine, module=module
            ) -> None:
                with engine():
                    sm = script_once(extra)
                    status = optimize_for_mobile_status()
                    extra["optimize_for_mobile"] = "applied" if status is None else status

                    def mobile(sm: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
                        if status is None:
                            from torch.utils.mobile_optimizer import optimize_for_mobile

                            try:
                                return optimize_for_mobile(sm)
                            except Exception as e:
                                extra["optimize_for_mobile"] = f"failed, written without it: {_error(e)}"
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
                            extra["script_failed"] = f"lite interpreter cannot load the scripted module: {_error(e)}"
                            traced = _to_torchscript(module, ex.example_input, {}, use_script=False)
                            mobile(traced)._save_for_lite_interpreter(str(tmp))

                    atomic_write(path, write)

            def load_ptl(path: Path, wrap=wrap, engine=engine) -> Callable[[Tensor], Tensor]:
                with engine():
                    return wrap(_load_for_lite_interpreter(str(path), map_location="cpu"))

            ex.produce(
                f"lite-{tag}", "lite", precision, backend, f"{tag}.ptl", build_ptl, load_ptl,
                eager_variant=eager_variant,
            )  # fmt: skip


# --------------------------------------------------------------------------- ExecuTorch


def _export_executorch(
    ex: _Exporter, model: nn.Module, precisions: tuple[str, ...], calibration: Sequence[Tensor] | None
) -> None:
    for precision in precisions:

        def build(path: Path, extra: dict, precision: str = precision) -> None:
            from pqv_lightning.executorch_lowering import export_pte

            result = export_pte(model, ex.example_input, precision=precision, calibration=calibration)
            extra["delegated_nodes"] = int(result.delegated_nodes)
            extra["outside_ops"] = dict(result.outside_ops)
            atomic_write_bytes(path, bytes(result.buffer))

        def load(path: Path) -> Callable[[Tensor], Tensor]:
            from pqv_lightning.executorch_lowering import run_pte

            program = path.read_bytes()
            return lambda x: run_pte(program, x)

        label = "int8" if precision == "int8_dynamic" else precision
        ex.produce(f"executorch-{precision}", "executorch", label, "xnnpack", f"{precision}.pte", build, load)


# --------------------------------------------------------------------------- ONNX

ONNX_OPSET = 18  # the torch.onnx (dynamo) exporter's native opset; onnxruntime 1.31 runs it


def _onnx_export_proto(model: nn.Module, example_input: Tensor, extra: dict):
    """ONNX model proto from the dynamo exporter; the legacy TorchScript exporter if that fails."""
    import onnx

    try:
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, opset_version=ONNX_OPSET, external_data=False, verbose=False
        )
        extra["onnx_exporter"] = "dynamo"
        extra["opset"] = ONNX_OPSET
        return program.model_proto
    except Exception as e:
        extra["onnx_exporter"] = "legacy (torchscript-based)"
        extra["dynamo_failed"] = _error(e)
        log.warning("torch.onnx dynamo export failed (%s); using the legacy exporter", extra["dynamo_failed"])
    import io

    buf = io.BytesIO()
    opset = 17
    torch.onnx.export(
        model, (example_input,), buf, dynamo=False, opset_version=opset,
        input_names=["input"], output_names=["logits"],
    )  # fmt: skip
    extra["opset"] = opset
    return onnx.load_from_string(buf.getvalue())


class _OrtAttention(nn.Module):
    """A timm ``Attention`` written as the subgraph onnxruntime's transformer optimizer fuses into one
    ``Attention`` node (which ``quantize_dynamic`` turns into ``QAttention``, the QKV projection in int8).

    The fusion matches separate q/k/v ``MatMul`` + ``Add`` projections, 4-D matmuls and a division of the
    scores by ``sqrt(head_dim)`` (it then assumes that scale), so the packed ``qkv`` weights are split in
    three, missing biases become zeros, and the module's own softmax scale is folded into the q rows. The
    function is the module's: the stored ``scale`` on timm's eager path, ``head_dim ** -0.5`` on its fused
    (SDPA) path. Masked calls go to the original module.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.original = attn
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        scale = self.head_dim**-0.5 if attn.fused_attn else float(attn.scale)
        self.sqrt_d = math.sqrt(self.head_dim)
        fold = scale * self.sqrt_d
        weight = attn.qkv.weight.detach()
        bias = attn.qkv.bias.detach() if attn.qkv.bias is not None else weight.new_zeros(weight.shape[0])
        a = self.attn_dim
        self.q, self.k, self.v = (nn.Linear(weight.shape[1], a) for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(weight[i * a : (i + 1) * a])
                lin.bias.copy_(bias[i * a : (i + 1) * a])
            if abs(fold - 1.0) > 1e-12:
                self.q.weight.mul_(fold)
                self.q.bias.mul_(fold)
        self.proj = attn.proj

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            return self.original(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, d).permute(0, 2, 3, 1)
        v = self.v(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        attn = (torch.matmul(q, k) / self.sqrt_d).softmax(dim=-1)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, self.attn_dim)
        return self.proj(out)


def _is_patchify_conv(module: nn.Module) -> bool:
    """A plain ``Conv2d`` whose stride equals its kernel: non-overlapping patches, no padding/dilation/groups."""
    return (
        type(module) is nn.Conv2d
        and tuple(module.stride) == tuple(module.kernel_size)
        and tuple(module.padding) == (0, 0)
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def _to_patches(x: Tensor, kh: int, kw: int) -> tuple[Tensor, int, int]:
    """``[B, C, H, W]`` -> ``[B, gh * gw, C * kh * kw]`` rows in the order of a patchify conv's weight (rows
    and columns beyond whole patches dropped, as the conv does); also ``gh``, ``gw``."""
    b, c, height, width = x.shape
    gh, gw = height // kh, width // kw
    if (gh * kh, gw * kw) != (height, width):  # a no-op slice exports as an alias XNNPACK does not take
        x = x[:, :, : gh * kh, : gw * kw]
    return x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * kh * kw), gh, gw


class _PatchifyLinear(nn.Module):
    """A patchify ``Conv2d`` (see :func:`_is_patchify_conv`) as patch reshape + its own ``nn.Linear``:
    onnxruntime quantizes that ``MatMul`` (its ``ConvInteger`` took 3.7 of 37 ms of an int8 deit_small
    forward, 1 thread; a ``MatMul`` on the reshaped conv weight stays float). Returns the conv's NCHW output."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        self.kh, self.kw = conv.kernel_size
        self.linear = nn.Linear(conv.in_channels * self.kh * self.kw, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.detach().reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        patches, gh, gw = _to_patches(x, self.kh, self.kw)
        return self.linear(patches).reshape(x.shape[0], gh, gw, self.out_channels).permute(0, 3, 1, 2)


def prepare_for_onnxruntime(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """An eval-mode copy of ``model`` computing the same function in the form onnxruntime runs fastest in int8.

    Every plain timm ``Attention`` (no q/k norm, scale norm or gate) becomes :class:`_OrtAttention` (fusable
    into onnxruntime's ``Attention``), every patchify ``Conv2d`` becomes :class:`_PatchifyLinear`. Returns
    the copy and how many modules of each kind were rewritten.
    """
    from timm.layers import Attention

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    prepared = copy.deepcopy(model).eval()
    counts = {"attention": 0, "patchify_conv": 0}
    for parent in list(prepared.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is Attention
                and isinstance(child.q_norm, nn.Identity)
                and isinstance(child.k_norm, nn.Identity)
                and isinstance(child.norm, nn.Identity)
                and getattr(child, "gate", None) is None
            ):
                setattr(parent, name, _OrtAttention(child))
                counts["attention"] += 1
            elif _is_patchify_conv(child):
                setattr(parent, name, _PatchifyLinear(child))
                counts["patchify_conv"] += 1
    return prepared, counts


def _unfuse_skip_layer_norm(graph) -> int:
    """Replace every ``SkipLayerNormalization`` node by ``Add`` (+ ``Add`` for its bias) and a standard
    ``LayerNormalization``; returns how many. onnxruntime 1.31's CPU SkipLayerNormalization kernel took
    0.32 ms per call on deit_small where ``LayerNormalization`` took 0.04 ms (2 threads), which cost more than
    the fused attention saves; the transformer optimizer needs it to find the attention, so it is undone
    after fusion."""
    from onnx import helper

    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "SkipLayerNormalization":
            nodes.append(node)
            continue
        count += 1
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma, beta, bias = (list(node.input) + [""] * 5)[:5]
        out, mean, inv_std, total = (list(node.output) + [""] * 4)[:4]
        total = total or f"{node.name}_skip_sum"
        if bias:
            nodes.append(helper.make_node("Add", [x, bias], [f"{node.name}_biased"], name=f"{node.name}_bias_add"))
            x = f"{node.name}_biased"
        nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{node.name}_skip_add"))
        ln_outputs = [out, mean, inv_std]
        while ln_outputs and not ln_outputs[-1]:
            ln_outputs.pop()
        nodes.append(
            helper.make_node(
                "LayerNormalization", [total, gamma] + ([beta] if beta else []), ln_outputs,
                name=f"{node.name}_layer_norm", axis=-1, epsilon=eps,
            )
        )  # fmt: skip
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _projection_branch_first(graph) -> int:
    """Swap the inputs of every residual ``Add`` whose second input is a linear projection (``MatMul`` +
    bias ``Add``) and whose first is not; returns how many (a + b == b + a exactly).

    The attention fusion looks for the projection among the residual ``Add``'s inputs in order and takes the
    first ``Add`` it meets: in the first block the residual itself comes from an ``Add`` (class token +
    position embedding), so without the swap that block's attention is never fused.
    """
    producers = {out: node for node in graph.node for out in node.output}

    def is_projection(name: str) -> bool:
        node = producers.get(name)
        return (
            node is not None
            and node.op_type == "Add"
            and any(getattr(producers.get(i), "op_type", None) == "MatMul" for i in node.input)
        )

    swapped = 0
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        first, second = node.input
        if first in producers and is_projection(second) and not is_projection(first):
            node.input[0], node.input[1] = second, first
            swapped += 1
    return swapped


def _fuse_for_onnxruntime(proto, out_path: Path, extra: dict) -> None:
    """onnxruntime's transformer optimizer (model type ``vit``, Python fusions only: the graph stays
    runnable by any onnxruntime build of this version) with SkipLayerNormalization undone; writes ``out_path``."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    work = onnx.ModelProto()
    work.CopyFrom(proto)
    _projection_branch_first(work.graph)
    # its modules log under their bare names (it puts its own folder on sys.path); they warn about the
    # producer name, num_heads=0 (detected per node instead) and pruned widths
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("onnxruntime.transformers", "fusion_", "onnx_model")) or name == "optimizer"
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(
            work, model_type="vit", num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=FusionOptions("vit"),
        )  # fmt: skip
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    extra["ort_fusions"] = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    extra["skip_layer_norm_unfused"] = _unfuse_skip_layer_norm(optimized.model.graph)
    del optimized.model.graph.value_info[:]  # stale shapes from the exporter; shape inference redoes them
    optimized.save_model_to_file(str(out_path))


def _ort_session(path: Path) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


class _CalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over calibration images cut to the export batch size."""

    def __init__(self, input_name: str, images: Sequence[Tensor], batch_size: int) -> None:
        flat = torch.cat([t.float() for t in images])
        n = (flat.shape[0] // batch_size) * batch_size
        if n == 0:
            raise ValueError(f"calibration holds {flat.shape[0]} images, fewer than the export batch {batch_size}")
        self._feeds = iter([{input_name: chunk.numpy()} for chunk in flat[:n].split(batch_size)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _export_onnx(
    ex: _Exporter,
    model: nn.Module,
    precisions: tuple[str, ...],
    calibration: Sequence[Tensor] | None,
    per_channel: bool,
    reduce_range: bool,
    optimize: bool = True,
) -> None:
    import onnx

    proto_cache: dict[str, Any] = {}
    prepared_cache: dict[str, Any] = {}

    def fp32_proto(extra: dict):
        if "proto" not in proto_cache:
            proto_cache["extra"] = {}
            proto_cache["proto"] = _onnx_export_proto(model, ex.example_input, proto_cache["extra"])
        extra.update(proto_cache["extra"])
        return proto_cache["proto"]

    def build_fp32(path: Path, extra: dict) -> None:
        proto = fp32_proto(extra)
        atomic_write(path, lambda tmp: onnx.save_model(proto, str(tmp)))

    if "fp32" in precisions:
        ex.produce("onnx-fp32", "onnx", "fp32", "onnxruntime-cpu", "fp32.onnx", build_fp32, _ort_session)

    def preprocessed(work: Path, extra: dict) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = work / "fp32.onnx"
        onnx.save_model(fp32_proto(extra), str(src))
        # onnxruntime's shape inference + graph cleanup: its quantizer fails on raw dynamo graphs without it.
        dst = work / "fp32.pre.onnx"
        quant_pre_process(str(src), str(dst))
        return dst

    def optimized(work: Path, extra: dict) -> Path:
        """The model rewritten by :func:`prepare_for_onnxruntime`, exported, fused and shape-inferred."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if "proto" not in prepared_cache:
            prepared, counts = prepare_for_onnxruntime(model)
            prepared_cache["counts"] = counts
            prepared_cache["extra"] = {}
            prepared_cache["proto"] = _onnx_export_proto(prepared, ex.example_input, prepared_cache["extra"])
        extra.update(prepared_cache["extra"])
        extra["prepared_for_onnxruntime"] = dict(prepared_cache["counts"])
        fused = work / "fused.onnx"
        _fuse_for_onnxruntime(prepared_cache["proto"], fused, extra)
        dst = work / "fused.pre.onnx"
        quant_pre_process(str(fused), str(dst), skip_optimization=True)
        return dst

    def build_int8(path: Path, extra: dict) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=ex.out_dir, prefix=".onnx-work-") as work:
            src = None
            if optimize:
                stage: dict = {}
                try:
                    src = optimized(Path(work), stage)
                    extra.update(stage)
                except Exception as e:  # the plain graph below is still a correct int8 model
                    extra["onnxruntime_optimization_failed"] = _error(e)
                    log.warning("onnx int8: onnxruntime fusion failed (%s); quantizing the plain graph", _error(e))
            extra["onnxruntime_optimized"] = src is not None
            if src is None:
                src = preprocessed(Path(work), extra)
            extra.update(
                quantization=("dynamic (MatMul/Gemm/Attention weights int8, activations uint8 quantized at run time)"),
                per_channel=per_channel,
                reduce_range=reduce_range,
            )
            atomic_write(
                path,
                lambda tmp: quantize_dynamic(
                    str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                    reduce_range=reduce_range,
                ),
            )  # fmt: skip

    def build_qdq(path: Path, extra: dict) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not calibration:
            raise ValueError("onnx precision 'int8_qdq' needs calibration images")
        with tempfile.TemporaryDirectory(dir=ex.out_dir, prefix=".onnx-work-") as work:
            src = preprocessed(Path(work), extra)
            input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
            reader = _CalibrationReader(input_name, calibration, ex.input_shape[0])
            extra.update(
                quantization="static QDQ (int8 weights and activations, MinMax calibration)",
                per_channel=per_channel,
                reduce_range=reduce_range,
            )
            atomic_write(
                path,
                lambda tmp: quantize_static(
                    str(src), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                ),
            )  # fmt: skip

    if "int8" in precisions:
        ex.produce("onnx-int8", "onnx", "int8", "onnxruntime-cpu", "int8.onnx", build_int8, _ort_session)
    if "int8_qdq" in precisions:
        ex.produce("onnx-int8_qdq", "onnx", "int8", "onnxruntime-cpu", "int8_qdq.onnx", build_qdq, _ort_session)


# --------------------------------------------------------------------------- entry point


def export_artifacts(
    model: nn.Module,
    out_dir: str | os.PathLike,
    formats: Sequence[str],
    example_input: Tensor,
    val_batches: Sequence[tuple[Tensor, Tensor]],
    quantized: Sequence[QuantizedModel] = (),
    calibration: Sequence[Tensor] | None = None,
    executorch_precisions: Sequence[str] = ("fp32", "int8", "int4"),
    onnx_precisions: Sequence[str] = ("fp32", "int8"),
    *,
    thresholds: VerifyThresholds | None = None,
    onnx_per_channel: bool = True,
    onnx_reduce_range: bool = False,
    onnx_optimize: bool = True,
    prefix: str = "model_",
) -> list[ArtifactRecord]:
    """Export ``model`` (and TorchScript-able ``quantized`` variants) in ``formats`` and verify each file.

    Every artifact is loaded back in its own runtime and run on all of ``val_batches``; its record holds
    top-1 agreement with the eager float model, the largest |logit difference|, and val top-1/top-5
    computed from the runtime's outputs. A failure in one format or precision is recorded (exception type
    and message) and the others go on. Files are named ``{prefix}{variant}.{ext}`` inside ``out_dir``.

    ONNX int8 uses onnxruntime dynamic quantization with per-channel weights by default (ViT linear layers
    have rows of very different ranges; per-tensor scales cost accuracy) and ``reduce_range=False`` (7-bit
    weights only help on x86 CPUs without VNNI, at a cost in accuracy everywhere else). ``"int8_qdq"`` adds
    a static QDQ model calibrated on ``calibration``.

    With ``onnx_optimize`` (default) ONNX int8 is quantized from an onnxruntime-optimized graph: the model is
    first rewritten by :func:`prepare_for_onnxruntime` (same function), onnxruntime's transformer optimizer
    fuses each attention into one ``Attention`` node (quantized to ``QAttention``), LayerNorm and GELU
    into their fused ops, and its ``SkipLayerNormalization`` nodes are turned back into ``Add`` +
    ``LayerNormalization`` (faster on CPU). If any of that fails, the plain exported graph is quantized
    and the reason recorded (``extra["onnxruntime_optimization_failed"]``); the file is verified either way.
    """
    fmts = validate_formats(formats)
    et_precisions = validate_precisions(executorch_precisions, EXECUTORCH_PRECISIONS, "executorch")
    ox_precisions = validate_precisions(onnx_precisions, ONNX_PRECISIONS, "onnx")
    _check_example_input(example_input)
    _check_val_batches(val_batches, example_input)
    needs_calibration = [f"executorch {p}" for p in et_precisions if "executorch" in fmts and p == "int8"]
    needs_calibration += [f"onnx {p}" for p in ox_precisions if "onnx" in fmts and p == "int8_qdq"]
    if needs_calibration and not calibration:
        raise ValueError(f"{', '.join(needs_calibration)} need calibration images; got calibration={calibration!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(onnx_optimize, bool):
        raise TypeError(f"onnx_optimize must be True or False; got {onnx_optimize!r}")
    names = []
    for q in quantized:
        if not (hasattr(q, "target") and isinstance(getattr(q, "module", None), nn.Module)):
            raise TypeError(f"quantized entries must be QuantizedModel objects; got {type(q).__name__}")
        names.append(q.target.name)
    if len(set(names)) != len(names):
        raise ValueError(f"quantized holds the same target twice: {names}")
    out = check_output_dir(out_dir)
    thresholds = thresholds or VerifyThresholds()
    example_input = example_input.detach().float().cpu().contiguous()

    was_training = model.training
    model.eval()
    try:
        pieces = _make_pieces(model, val_batches, example_input.shape[0])
        ex = _Exporter(out, example_input, pieces, thresholds, prefix)
        if "torchscript" in fmts or "lite" in fmts:
            with deprecations_silenced(
                "TorchScript and lite export use deprecated PyTorch APIs (kept for PQV-Mobile's formats; "
                "ExecuTorch is their successor); their deprecation warnings are silenced.",
                _JIT_DEPRECATIONS,
            ):
                _export_torchscript_family(ex, model, fmts, quantized)
        if "executorch" in fmts:
            _export_executorch(ex, model, et_precisions, calibration)
        if "onnx" in fmts:
            _export_onnx(ex, model, ox_precisions, calibration, onnx_per_channel, onnx_reduce_range, onnx_optimize)
    finally:
        model.train(was_training)
    return ex.records


def write_manifest(records: Sequence[ArtifactRecord], path: str | os.PathLike, meta: dict) -> None:
    """Write the records as JSON, atomically. Artifact paths inside the manifest's folder are stored relative
    to it, so the folder can be moved as a whole."""
    path = Path(path)
    rows = []
    for rec in records:
        row = asdict(rec)
        row["extra"] = {k: v for k, v in row["extra"].items() if k != "traceback"}
        if rec.path is not None:
            p = Path(rec.path)
            with contextlib.suppress(ValueError):
                row["path"] = p.resolve().relative_to(path.parent.resolve()).as_posix()
        rows.append(row)
    doc = {
        "manifest_version": MANIFEST_VERSION,
        "meta": meta,
        "environment": _environment(),
        "artifacts": rows,
    }
    write_json(path, doc)


def _environment() -> dict[str, str]:
    from importlib import metadata

    env = {}
    for pkg in ("torch", "executorch", "onnx", "onnxruntime", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[pkg] = metadata.version(pkg)
    return env
