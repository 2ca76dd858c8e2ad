"""ExecuTorch (``.pte``) programs lowered to XNNPACK: how they are exported, written and run.

Exporting needs ``executorch.exir`` (imported inside :func:`export_pte`); running needs only the extension
module ``executorch.extension.pybindings._C``, so that a process that runs a program does not import the
exporter (``executorch.runtime`` and ``portable_lib`` import ``executorch.exir``: about 7 s).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pqv_lightning.export.eager import random_tensor, set_torch_threads
from pqv_lightning.export.formats import LoadedArtifact, get_format
from pqv_lightning.export.inputs import check_tensor, described
from pqv_lightning.export.verify import reference_pieces
from pqv_lightning.utils.checks import check_bool, check_choice, invalid
from pqv_lightning.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from pqv_lightning.export.writer import ArtifactWriter, ExportJob
    from pqv_lightning.quantization import QuantizedModel

__all__ = [
    "FP16_ATTENTION_PRECISIONS",
    "PteProgram",
    "PteResult",
    "check_attention",
    "check_model",
    "check_request",
    "export_pte",
    "load",
    "load_program",
    "prepare_runtime",
    "qat_lowerable",
    "random_input",
    "run_pte",
    "runtime_logs_at_debug",
    "set_threadpool",
    "write",
    "write_executorch",
    "write_executorch_variant",
]

_NON_COMPUTE = {"getitem", "executorch_call_delegate"}
_INT4_GROUP = 32  # the int4 group size XNNPACK delegates
_FORMAT = get_format("executorch")
#: ``.pte`` precisions that take fp16 attention. Not static ``int8``: ExecuTorch 1.5's XNNPACK
#: ``RemoveRedundantCopyPass`` takes a dtype cast between static q/dq nodes for a layout copy and drops it.
FP16_ATTENTION_PRECISIONS = ("fp32", "int8_dynamic", "int4")


def check_attention(attention: str, precisions: Sequence[str], name: str = "attention") -> str:
    """``attention`` checked against the ``.pte`` precisions it is asked for with."""
    _FORMAT.option("attention").check(attention, name)
    refused = [p for p in precisions if attention != "fp32" and p not in FP16_ATTENTION_PRECISIONS]
    if refused:
        raise invalid(
            name,
            attention,
            f"'fp32' with executorch precision {', '.join(map(repr, refused))}; fp16 attention is "
            f"exported with {', '.join(FP16_ATTENTION_PRECISIONS)} (static int8 loses its casts in ExecuTorch 1.5)",
        )
    return attention


def check_request(precisions: Sequence[str], options: dict[str, Any], name_of: Callable[[str], str]) -> None:
    """Refuse options these precisions cannot be written with (the format protocol)."""
    check_attention(options["attention"], precisions, name_of("attention"))


def check_model(
    model: nn.Module, precisions: Sequence[str], options: dict[str, Any], name_of: Callable[[str], str] | str
) -> None:
    """Refuse fp16 attention for a model without attention blocks the ``.pte`` rewrite knows (before any work).
    ``name_of`` names an option in messages: a function of the option's name, or the options' prefix (a str)."""
    if options["attention"] != "fp32" and precisions:
        from pqv_lightning.export.xnnpack_rewrites import check_attention_blocks

        name = name_of("attention") if callable(name_of) else f"{name_of}[{'attention'!r}]"
        check_attention_blocks(model, options["attention"], name)


def write(writer: ArtifactWriter, model: nn.Module, job: ExportJob) -> None:
    """Write and verify the ``.pte`` files of ``job`` (the format protocol): one per precision, then one per
    quantization-aware-trained variant ExecuTorch lowers as it is (the others recorded as skipped)."""
    precisions = job.artifacts.get("executorch", ())
    keep = {p: job.keep("executorch", p) for p in precisions}
    sources = {p: job.model_for("executorch", p, model) for p in precisions}
    attention = job.options["executorch"]["attention"]
    write_executorch(writer, model, precisions, job.calibration, keep, attention, sources)
    for variant in job.trained:
        if not qat_lowerable(variant):
            writer.record(
                f"executorch-{variant.name}",
                "executorch",
                variant.target.precision,
                variant.target.backend,
                status="skipped",
                reason=f"a quantization-aware-trained {variant.target} model is not lowered by "
                "ExecuTorch as it is (int8_pt2e:xnnpack and int4_weight:xnnpack are)",
            )
            continue
        float_pieces = writer.pieces  # verified against the QAT model's converted form
        writer.pieces = reference_pieces(variant.module, writer.val_batches, writer.example_input.shape[0])
        try:
            write_executorch_variant(writer, variant)
        finally:
            writer.pieces = float_pieces


def qat_lowerable(variant: QuantizedModel) -> bool:
    """Whether a variant is a QAT model ExecuTorch lowers as it is (INT8 PT2E for XNNPACK, INT4 weights)."""
    return variant.origin == "qat" and str(variant.target) in ("int8_pt2e:xnnpack", "int4_weight:xnnpack")


@dataclass
class PteResult:
    """A lowered ExecuTorch program and what the XNNPACK partitioner left outside it.

    ``delegated_nodes`` counts the ``call_function`` nodes (``getitem`` excluded) of the graphs handed to
    XNNPACK, summed over all delegates; ``num_delegates`` is how many delegate calls the program makes.
    ``outside_ops`` maps each compute operator left in the top-level graph (run by portable kernels) to its
    count; empty means fully delegated.
    """

    buffer: bytes
    delegated_nodes: int
    outside_ops: dict[str, int]
    num_delegates: int = 0
    precision: str = "fp32"
    prepared: bool = True
    outside_detail: list[str] = field(default_factory=list)
    attention: str = "fp32"


# --------------------------------------------------------------------------- export


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_op") or "EdgeOpOverload" in type(target).__name__:
        schema_name = getattr(target, "_schema", None)
        if schema_name is not None:
            overload = schema_name.overload_name or "default"
            return f"{schema_name.name.split('::')[-1]}.{overload}"
    return name


def _count_lowered(graph_module: torch.fx.GraphModule) -> tuple[int, int, dict[str, int]]:
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    delegated = 0
    delegates = 0
    for _, sub in graph_module.named_modules():
        if isinstance(sub, LoweredBackendModule):
            delegates += 1
            delegated += sum(
                1
                for n in sub.original_module.graph.nodes
                if n.op == "call_function" and _op_name(n.target) not in _NON_COMPUTE
            )
    outside = collections.Counter(
        _op_name(n.target)
        for n in graph_module.graph.nodes
        if n.op == "call_function" and _op_name(n.target) not in _NON_COMPUTE
    )
    return delegated, delegates, dict(sorted(outside.items()))


def _quantize(
    model: nn.Module,
    precision: str,
    example: Tensor,
    calibration: Iterable[Tensor] | None,
    float_layers: Sequence[str] = (),
):
    from pqv_lightning.quantization import quantize, quantize_pt2e

    keep = {"float_layers": tuple(float_layers)}
    if precision == "int8":
        return quantize_pt2e(model, "xnnpack", example, calibration, **keep)
    if precision == "int8_dynamic":
        return quantize_pt2e(model, "xnnpack", example, None, dynamic_activations=True, **keep)
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in float_layers]
    if all(m.in_features % _INT4_GROUP == 0 for m in linears):
        return quantize(model, "int4_weight:xnnpack", example, **keep).module
    # XNNPACK takes 4-bit weights in groups of 32 or per output channel. Pruned widths (e.g. 144) leave no
    # group of 32, and torchao's per-channel form does not lower: PT2E's 4-bit per-channel config does.
    return quantize_pt2e(model, "xnnpack", example, None, weight_bits=4, **keep)


def _lowerable_qat(variant: QuantizedModel) -> tuple[nn.Module, str, bool]:
    """What the ``.pte`` of a QAT variant lowers: (module, precision, quantized already). A converted PT2E graph
    and a torchao INT4 model in groups of 32 are lowered as they are; torchao's per-channel INT4 form does not
    lower, so its trained float weights are quantized to PT2E 4-bit per channel (the same weights grid)."""
    precision = variant.target.precision
    if variant.target.method == "int8_pt2e" or _int4_in_groups(variant.module):
        return variant.module, precision, True
    if variant.source is None:
        raise ValueError(f"{variant.name}: per-channel INT4 needs the trained float weights (QuantizedModel.source)")
    return variant.source, precision, False


def _int4_in_groups(module: nn.Module) -> bool:
    """Whether every INT4 weight of a torchao model is in groups of 32 (the form XNNPACK lowers)."""
    blocks = [getattr(m.weight, "block_size", None) for m in module.modules() if isinstance(m, nn.Linear)]
    blocks = [b for b in blocks if b is not None]
    return bool(blocks) and all(int(b[-1]) == _INT4_GROUP for b in blocks)


def export_pte(
    model: nn.Module,
    example_input: Tensor,
    precision: str = "fp32",
    calibration: Iterable[Tensor] | None = None,
    prepare: bool = True,
    float_layers: Sequence[str] = (),
    quantized: bool = False,
    attention: str = "fp32",
) -> PteResult:
    """Export ``model`` to an ExecuTorch program lowered to XNNPACK.

    precision: ``"fp32"``; ``"int8"`` (static, per-channel weights, activations calibrated on
    ``calibration``, via :func:`pqv_lightning.quantization.quantize_pt2e`); ``"int8_dynamic"`` (PT2E
    ``XNNPACKQuantizer`` dynamic per-channel); ``"int4"`` (torchao int4 weights in groups of 32 with int8
    dynamic activations, on ``nn.Linear`` layers). ``prepare=False`` lowers the model as it comes (for
    comparison); otherwise :func:`~pqv_lightning.export.prepare_for_xnnpack` and the static-reshape rewrite
    are applied (see :mod:`pqv_lightning.export.xnnpack_rewrites` for why).

    ``float_layers`` (names or globs of layers or blocks) stay in float: the delegate runs them in fp32.
    ``quantized=True`` lowers a model that is quantized already (a converted PT2E graph or a torchao INT4 model,
    e.g. from quantization-aware training) as it is; ``precision`` then only labels it.

    ``attention="fp16"`` runs the attention products and softmax of every timm ``Attention`` in fp16 inside the
    delegate (native on CPUs with fp16 arithmetic, fp32 elsewhere; see
    :func:`~pqv_lightning.export.prepare_for_xnnpack` and :mod:`pqv_lightning.export.xnnpack_casts`).
    """
    check_choice("precision", precision, _FORMAT.precisions)
    if not isinstance(model, nn.Module):
        raise invalid("model", described(model), "a torch.nn.Module")
    check_tensor("example_input", example_input)
    check_bool("prepare", prepare)
    check_bool("quantized", quantized)
    check_attention(attention, [precision])
    if attention != "fp32" and (quantized or not prepare):
        reason = "quantized already" if quantized else "prepare=False"
        raise invalid("attention", attention, f"'fp32' for a model this call does not prepare ({reason})")
    if precision == "int8" and calibration is None and not quantized:
        raise invalid("calibration", calibration, "calibration batches: precision 'int8' (static) needs them")
    if float_layers and (precision == "fp32" or quantized):
        reason = "quantized already" if quantized else "precision 'fp32'"
        raise invalid("float_layers", list(float_layers), f"none for a model this call does not quantize ({reason})")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.configs import (
        get_transform_passes,
        get_xnnpack_edge_compile_config,
        get_xnnpack_executorch_backend_config,
    )
    from executorch.exir import to_edge_transform_and_lower

    from pqv_lightning.export.xnnpack_casts import float_cast_partitioner
    from pqv_lightning.export.xnnpack_rewrites import (
        StaticReshapePass,
        check_attention_blocks,
        prepare_for_xnnpack,
    )

    check_attention_blocks(model, attention)

    if quantized and isinstance(model, torch.fx.GraphModule):
        work = copy.deepcopy(model)  # a converted graph: nothing left to rewrite
        work.eval()  # its dropout nodes in eval form (an exported graph's eval() returns None)
    else:
        work = prepare_for_xnnpack(model, attention) if prepare else copy.deepcopy(model).eval()
    with torch.no_grad():
        if precision != "fp32" and not quantized:
            work = _quantize(work, precision, example_input, calibration, float_layers)
        exported = torch.export.export(work, (example_input,), strict=False)
    passes = get_transform_passes([StaticReshapePass()]) if prepare else None
    edge = to_edge_transform_and_lower(
        exported,
        transform_passes=passes,
        partitioner=[XnnpackPartitioner() if attention == "fp32" else float_cast_partitioner()],
        compile_config=get_xnnpack_edge_compile_config(),
    )
    delegated, delegates, outside = _count_lowered(edge.exported_program().graph_module)
    program = edge.to_executorch(get_xnnpack_executorch_backend_config())
    return PteResult(
        buffer=program.buffer,
        delegated_nodes=delegated,
        outside_ops=outside,
        num_delegates=delegates,
        precision=precision,
        prepared=prepare,
        attention=attention,
    )


def write_executorch(
    writer: ArtifactWriter,
    model: nn.Module,
    precisions: tuple[str, ...],
    calibration: Sequence[Tensor] | None,
    float_layers: dict[str, Sequence[str]] | None = None,
    attention: str = "fp32",
    sources: dict[str, nn.Module] | None = None,
) -> None:
    """Write and verify one ``.pte`` per precision (``int8_dynamic`` is recorded as precision ``int8``);
    ``float_layers[precision]`` stay in float (recorded in the file's ``extra["float_layers"]``); ``sources[precision]``
    is the float model that file is quantized from where it is not ``model`` (rounded weights).

    With ``attention="fp16"`` every file's attention products run in fp16 (``export_pte``). This machine's XNNPACK
    may run them in fp32 (no fp16 arithmetic), so each record also holds ``extra["attention_eager"]``: how the float
    model with fp16 attention, run by torch, agrees with the float model on the verification images.
    """
    check_attention(attention, precisions)
    eager_check: dict[str, float] = {}  # made by the first file that needs it: a failure there is that file's
    for precision in precisions:
        keep = tuple((float_layers or {}).get(precision, ()))

        def build(path: Path, extra: dict, precision: str = precision, keep: tuple[str, ...] = keep) -> None:
            result = export_pte(
                (sources or {}).get(precision, model),
                writer.example_input,
                precision=precision,
                calibration=calibration,
                float_layers=keep,
                attention=attention,
            )
            _record(extra, result, path)
            _record_tokens(extra, model, writer)
            if precision != "fp32":
                extra["float_layers"] = list(keep)
            if attention != "fp32":
                if not eager_check:
                    eager_check.update(_attention_eager_check(writer, model, attention))
                extra["attention_eager"] = dict(eager_check)

        label = "int8" if precision == "int8_dynamic" else precision
        writer.produce(f"executorch-{precision}", "executorch", label, "xnnpack", f"{precision}.pte", build, _verifier)


def write_executorch_variant(writer: ArtifactWriter, variant: QuantizedModel) -> None:
    """Write and verify the ``.pte`` of a quantized variant made elsewhere (quantization-aware training): the
    variant is lowered as it is, and ``writer`` verifies against the variant's own eager module."""
    module, precision, quantized = _lowerable_qat(variant)

    def build(path: Path, extra: dict) -> None:
        result = export_pte(module, writer.example_input, precision=precision, quantized=quantized)
        _record(extra, result, path)
        extra.update(origin=variant.origin, float_layers=variant.float_layers, reference=f"{variant.name} eager")
        if not quantized:
            extra["quantized_as"] = "PT2E 4-bit per-channel weights of the trained float weights (see _lowerable_qat)"

    name = variant.name
    writer.produce(f"executorch-{name}", "executorch", precision, "xnnpack", f"{name}.pte", build, _verifier)


def _attention_eager_check(writer: ArtifactWriter, model: nn.Module, attention: str) -> dict[str, float]:
    """Top-1 agreement, largest |logit difference| and top-1 of ``model`` with its attention products in
    ``attention``, run eagerly, against the float model on the writer's verification images."""
    from pqv_lightning.export.verify import verify_outputs
    from pqv_lightning.export.xnnpack_rewrites import prepare_for_xnnpack

    eager = prepare_for_xnnpack(model, attention)
    with torch.inference_mode():
        metrics, _, _ = verify_outputs(eager, writer.pieces, attention, writer.thresholds)
    return {key: float(metrics[key]) for key in ("top1_agreement", "max_abs_logit_diff", "val_top1")}


def _record_tokens(extra: dict, model: nn.Module, writer: ArtifactWriter) -> None:
    """``extra["tokens"]``: the token reduction the file runs (method, ``r``, tokens per block), if any. What stays
    outside the delegate of a token-reducing program is its matching (``extra["outside_ops"]``)."""
    from pqv_lightning.tokens import token_summary

    summary = token_summary(model, writer.input_shape[-2:])
    if summary is not None:
        extra["tokens"] = summary


def _record(extra: dict, result: PteResult, path: Path) -> None:
    extra["attention"] = result.attention
    extra["delegated_nodes"] = int(result.delegated_nodes)
    extra["outside_ops"] = dict(result.outside_ops)
    atomic_write_bytes(path, bytes(result.buffer))


def _verifier(path: Path):
    return load(str(path), "executorch", None, None, False).predict


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class PteProgram:
    """A loaded program and its ``forward`` method, held together with the buffer they were loaded from: a
    method must not outlive its program. Calling it runs ``forward`` on a list of inputs."""

    data: bytes
    program: Any
    method: Any

    def __call__(self, inputs: list[Tensor]) -> list[Tensor]:
        return self.method(inputs)


_RUNTIME_LOG_LINE = re.compile(r"^\[[\w.]+\.(?:cpp|h):\d+\] ")


@contextlib.contextmanager
def runtime_logs_at_debug() -> Iterator[None]:
    """Route what the ExecuTorch C++ runtime prints to stderr in this block to ``logging`` at DEBUG.

    Its ``ET_LOG`` lines (``[cpuinfo_utils.cpp:87] Failed to open midr file ...`` when the threadpool is first
    made, ``[threadpool.cpp:66] Resetting threadpool ...``) are written straight to file descriptor 2, past
    Python's ``sys.stderr``, so the descriptor itself is redirected for the block; any other line is passed back
    to stderr as it came.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
    for line in text.splitlines():
        if _RUNTIME_LOG_LINE.match(line):
            log.debug("executorch runtime: %s", line)
        elif line.strip():
            print(line, file=sys.stderr)


def load_program(data: bytes, etdump: bool = False) -> PteProgram:
    """Load a program from its bytes with the extension module alone (``etdump``: record ETDump events)."""
    from executorch.extension.pybindings import _C

    with runtime_logs_at_debug():
        program = _C._load_program_from_buffer(
            data,
            enable_etdump=etdump,
            debug_buffer_size=0,
            program_verification=_C.Verification.InternalConsistency,
            data_path=None,
        )
        method = program.load_method("forward")
    return PteProgram(data, program, method)


def set_threadpool(threads: int | None) -> int:
    """Fix the ExecuTorch XNNPACK threadpool (process-global; its default is one thread per core) to ``threads``
    (``None``: leave it) and return the count it reports. Making the pool is where the runtime logs its CPU
    probing; those lines go to DEBUG (:func:`runtime_logs_at_debug`)."""
    from executorch.extension.pybindings import _C

    with runtime_logs_at_debug():
        if threads is not None and _C._threadpool_get_thread_count() != threads:
            _C._unsafe_reset_threadpool(threads)
        return int(_C._threadpool_get_thread_count())


def run_pte(program: bytes | str | os.PathLike, inputs: Tensor) -> Tensor:
    """Run the ``forward`` method of an ExecuTorch program (bytes or a ``.pte`` path) on ``inputs``."""
    if isinstance(program, (str, os.PathLike)):
        program = Path(program).read_bytes()
    if not isinstance(program, (bytes, bytearray)):
        raise invalid("program", described(program), "the bytes or the path of an ExecuTorch program")
    return load_program(bytes(program))([inputs.contiguous()])[0]


def load(path: str, kind: str, threads: int | None, engine: str | None, ort_spinning: bool) -> LoadedArtifact:
    """A ``.pte`` file, loaded for its ``forward`` method (``engine`` and ``ort_spinning`` do not apply)."""
    prepare_runtime(threads)
    loaded = load_program(Path(path).read_bytes())
    return LoadedArtifact(kind, lambda x: loaded([x.contiguous()])[0], lambda x: lambda: loaded([x]))


def prepare_runtime(threads: int | None) -> None:
    """Import the extension module; fix torch's intra-op threads and the XNNPACK threadpool (``None``: leave
    both)."""
    importlib.import_module("executorch.extension.pybindings._C")
    set_torch_threads(threads)
    set_threadpool(threads)  # made here, not at the first call: its start-up log lines go to DEBUG


def random_input(shape: list[int]) -> Tensor:
    return random_tensor(shape)
