"""The export formats, one :class:`ExportFormat` each, in one registry: what each file is and what it takes.

A format owns its name, suffix, precisions and defaults, which precisions calibrate on images or keep float layers,
its options, the module that writes, loads and runs its files, and what the report and the latency search need
(kernel library and its channel multiple, plot colour, whether the file runs only at its export shape). Every
other part of the package derives its tables from here: the exporter, the loader, the report, the latency search,
the width rounding, the callbacks, ``pqv-export`` and the sweeps. Adding a format is one module that implements
the format protocol (below) and one :func:`register_format` call in this file.

The format protocol, implemented by the module an :class:`ExportFormat` names (imported on first use):

* ``write(writer, model, job)``: write and verify the files of ``job.artifacts`` for the formats this module
  implements (:class:`~pqv_lightning.export.writer.ArtifactWriter`, :class:`~pqv_lightning.export.writer.ExportJob`);
* ``load(path, kind, threads, engine, ort_spinning) -> LoadedArtifact``, ``prepare_runtime(threads)`` and
  ``random_input(shape)``: run one file in its own runtime (what :mod:`~pqv_lightning.export.loader` calls);
* optional ``check_request(precisions, options, name)`` and ``check_model(model, precisions, options, name)``: refuse a
  combination of precisions and options, or a model, before any work.

A leaf module (no torch, no other module of the package but the argument checks): the probe process that only runs
one file imports it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pqv_lightning.utils.checks import check_bool, check_choices, invalid

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "DEFAULT_FORMATS",
    "FORMATS",
    "SUFFIXES",
    "ExportFormat",
    "FormatOption",
    "LoadedArtifact",
    "artifacts_from_arguments",
    "check_model_requests",
    "float_layer_files",
    "format_names",
    "format_of",
    "get_format",
    "legacy_artifact_parameters",
    "list_formats",
    "needs_calibration",
    "register_format",
    "resolve_artifacts",
    "resolve_options",
    "validate_formats",
]


@dataclass(frozen=True)
class FormatOption:
    """One setting of a format (``options={"<format>": {"<name>": value}}``): its accepted values, default first."""

    name: str
    choices: tuple[Any, ...]
    doc: str = ""

    @property
    def default(self) -> Any:
        return self.choices[0]

    def check(self, value: Any, name: str) -> Any:
        """``value`` if it is one of the choices (of the same type: ``1`` is not ``True``); else an argument error."""
        if isinstance(self.default, bool):
            return check_bool(name, value)
        if not any(value == choice and type(value) is type(choice) for choice in self.choices):
            raise invalid(name, value, ", ".join(map(str, self.choices)))
        return value


@dataclass(frozen=True)
class ExportFormat:
    """What one deployable file format is: name, suffix, precisions, options and the module that implements it.

    Args:
        name: the format's name (``artifacts`` keys, manifest records, latency targets ``<name>-<precision>``).
        suffix: the file suffix that names the format (``.pte``).
        module: the module that writes, loads and runs the files (the format protocol, see the module docstring).
        precisions: every precision the format writes, in the order files are written.
        default_precisions: what is written when the format is asked for without precisions.
        description: one line for help texts.
        calibrated: precisions that calibrate activations on images.
        float_layers: ``{precision: quantization target}``: the quantized files that can keep layers in float, and
            the :class:`~pqv_lightning.callbacks.Quantization` target whose chosen float layers they keep when the
            export names none.
        weight_grids: ``{precision: quantization target}``: the quantized files whose quantizer derives that target's
            weight grid, so that weights rounded for it (``Quantization(rounding="gptq")``, bias correction) reach
            the file as they are (:data:`pqv_lightning.quantization.GRIDS`).
        from_variants: precisions that are the :class:`~pqv_lightning.callbacks.Quantization` stage's variants
            rather than made by the format (none can be a latency target).
        options: the format's settings.
        default: exported when no format is named.
        takes_trained: writes quantization-aware-trained variants itself (the others record them as skipped).
        takes_engine: its files run under a ``torch.backends.quantized`` engine (torch.ao INT8).
        fixed_shape: its files run only at the input shape they were exported for.
        kernel: the int8 kernel library its files run on, and ``kernel_multiple`` the output-channel multiple those
            kernels prefer (measured by ``benchmarks/width_tiles.py``; ``StructuredPruning(round_to="auto")``).
        color: the format's colour in the report's plots.
        optional: the package the format needs beyond the required dependencies (``None``: none), for messages.
        companions: suffixes of the files written beside the named one (e.g. weights), removed and counted with it.
    """

    name: str
    suffix: str
    module: str
    precisions: tuple[str, ...]
    default_precisions: tuple[str, ...]
    description: str
    calibrated: tuple[str, ...] = ()
    float_layers: Mapping[str, str] = field(default_factory=dict)
    weight_grids: Mapping[str, str] = field(default_factory=dict)
    from_variants: tuple[str, ...] = ()
    options: tuple[FormatOption, ...] = ()
    default: bool = True
    takes_trained: bool = False
    takes_engine: bool = False
    fixed_shape: bool = False
    kernel: str = "torch"
    kernel_multiple: int = 4
    color: str = "#888888"
    optional: str | None = None
    companions: tuple[str, ...] = ()

    def files_of(self, path: str | os.PathLike) -> list[Path]:
        """The file at ``path`` and its companions (what one artifact of this format is on disk)."""
        return [Path(path), *(Path(path).with_suffix(suffix) for suffix in self.companions)]

    def implementation(self) -> ModuleType:
        """The module that implements the format protocol (imported now)."""
        return importlib.import_module(self.module)

    def option(self, name: str) -> FormatOption:
        for option in self.options:
            if option.name == name:
                return option
        accepted = ", ".join(o.name for o in self.options) or "none (this format has no options)"
        raise invalid(f"options[{self.name!r}]", name, f"an option of {self.name}: {accepted}")

    def check_precisions(self, values: Any, name: str) -> tuple[str, ...]:
        """``values`` (one precision or several; ``None``: the defaults) as a de-duplicated tuple in the format's
        order; empty means this format writes nothing."""
        if values is None:
            return self.default_precisions
        chosen = check_choices(name, values, self.precisions, allow_empty=True)
        return tuple(p for p in self.precisions if p in chosen)

    @property
    def latency_precisions(self) -> tuple[str, ...]:
        """The precisions a latency target can be measured on (made from the float model alone)."""
        return tuple(p for p in self.precisions if p not in self.from_variants)


_REGISTRY: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to the registry (its name and suffix must be new); returns it."""
    if not isinstance(fmt, ExportFormat):
        raise invalid("fmt", fmt, "an ExportFormat")
    if fmt.name in _REGISTRY:
        raise invalid("fmt.name", fmt.name, f"a name not registered yet (registered: {', '.join(_REGISTRY)})")
    taken = {f.suffix: f.name for f in _REGISTRY.values()}
    if fmt.suffix in taken:
        raise invalid("fmt.suffix", fmt.suffix, f"a suffix no other format has ({taken[fmt.suffix]} has it)")
    bad = [p for p in (*fmt.default_precisions, *fmt.calibrated, *fmt.float_layers, *fmt.from_variants)
           if p not in fmt.precisions]  # fmt: skip
    if bad or "-" in fmt.name:
        raise invalid(f"{fmt.name} precisions", bad or fmt.name, f"members of {fmt.precisions}; a name without '-'")
    _REGISTRY[fmt.name] = fmt
    return fmt


def list_formats(default_only: bool = False) -> tuple[ExportFormat, ...]:
    """The registered formats in registration order (the order files are written and shown)."""
    return tuple(f for f in _REGISTRY.values() if f.default or not default_only)


def format_names(default_only: bool = False) -> tuple[str, ...]:
    return tuple(f.name for f in list_formats(default_only))


def get_format(name: str, argument: str = "format") -> ExportFormat:
    """The registered format called ``name``; an argument error listing the formats otherwise."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    raise invalid(argument, name, ", ".join(_REGISTRY))


def format_of(path: str | os.PathLike) -> str:
    """The format of a file, from its suffix."""
    suffix = Path(path).suffix
    for fmt in _REGISTRY.values():
        if fmt.suffix == suffix:
            return fmt.name
    suffixes = ", ".join(f"{f.suffix} ({f.name})" for f in _REGISTRY.values())
    raise invalid("path", str(path), f"a file whose suffix names its format: {suffixes}")


def validate_formats(formats: Sequence[str] | str, name: str = "formats") -> tuple[str, ...]:
    """``formats`` (one name or several) as a de-duplicated tuple; at least one."""
    return check_choices(name, formats, tuple(_REGISTRY))


def resolve_artifacts(artifacts: Any = None, name: str = "artifacts") -> dict[str, tuple[str, ...]]:
    """The files to write, as ``{format: precisions}`` in registry order, checked against the registry.

    ``artifacts`` may be ``None`` (every default format at its default precisions), a format name or a list of
    them (each at its default precisions), or a mapping ``{format: precisions}`` where ``None`` means the format's
    defaults and an empty list none of its own precisions (the quantized variants it takes are still
    written). At least one format must be named.
    """
    if artifacts is None:
        return {f.name: f.default_precisions for f in list_formats(default_only=True)}
    if isinstance(artifacts, str) or (isinstance(artifacts, Sequence) and not isinstance(artifacts, Mapping)):
        artifacts = dict.fromkeys(validate_formats(artifacts, name))
    if not isinstance(artifacts, Mapping) or not artifacts:
        example = "{executorch: [fp32, int8], onnx: [fp32, int8]}"
        raise invalid(name, artifacts, f"a mapping of format to precisions such as {example}, or a list of formats")
    resolved = {}
    for key, precisions in artifacts.items():
        fmt = get_format(key, f"{name} key")
        resolved[fmt.name] = fmt.check_precisions(precisions, f"{name}[{fmt.name!r}]")
    return {f.name: resolved[f.name] for f in list_formats() if f.name in resolved}


def resolve_options(
    options: Mapping[str, Mapping[str, Any]] | None, artifacts: Mapping[str, Sequence[str]], name: str = "options"
) -> dict[str, dict[str, Any]]:
    """Every option of every format in ``artifacts`` (and of any other format given options): the given value
    (checked) or its default; then each exported format's ``check_request`` refuses what it cannot write."""
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise invalid(name, options, "a mapping such as {executorch: {attention: fp16}}")
    resolved: dict[str, dict[str, Any]] = {}
    for key, values in options.items():
        fmt = get_format(key, f"{name} key")
        if not isinstance(values, Mapping):
            raise invalid(f"{name}[{key!r}]", values, f"a mapping of option to value ({_options_line(fmt)})")
        for option_name, value in values.items():
            fmt.option(option_name).check(value, option_names(name, key)(option_name))
    for fmt_name in dict.fromkeys([*artifacts, *options]):  # options of a format not exported are kept (checked)
        given = options.get(fmt_name, {})
        resolved[fmt_name] = {o.name: given.get(o.name, o.default) for o in get_format(fmt_name).options}
    _check_requests(artifacts, resolved, name)
    return resolved


def _check_requests(
    artifacts: Mapping[str, Sequence[str]], options: Mapping[str, Mapping[str, Any]], name: str | None
) -> None:
    """Each format's ``check_request`` on its precisions and (complete) options; messages name the options as
    :func:`option_names` does under ``name``."""
    for fmt_name, precisions in artifacts.items():
        check = getattr(get_format(fmt_name).implementation(), "check_request", None)
        if check is not None and precisions:
            check(tuple(precisions), options[fmt_name], option_names(name, fmt_name))


def check_model_requests(
    model: Any, artifacts: Mapping[str, Sequence[str]], options: Mapping[str, Mapping[str, Any]]
) -> None:
    """Each requested format's ``check_model``: refuse, before any work, a model a format cannot write with its
    ``options`` (resolved, :func:`resolve_options`), e.g. fp16 attention in a model without attention blocks."""
    for fmt, precisions in iter_requests(artifacts):
        check = getattr(fmt.implementation(), "check_model", None)
        if check is not None:
            check(model, precisions, options[fmt.name], option_names("options", fmt.name))


def option_names(name: str, fmt: str) -> Callable[[str], str]:
    """How messages name the options of ``fmt``: ``options['executorch']['attention']``, or, for the keys of 0.1
    (``name=None``), ``executorch_attention``."""
    if name is None:
        return lambda option: f"{fmt}_{option}"
    return lambda option: f"{name}[{fmt!r}][{option!r}]"


def _options_line(fmt: ExportFormat) -> str:
    return "; ".join(f"{o.name}: {', '.join(map(repr, o.choices))}" for o in fmt.options) or "none"


def needs_calibration(artifacts: Mapping[str, Sequence[str]]) -> list[str]:
    """The files of ``artifacts`` that calibrate on images, as ``"<format> <precision>"``."""
    return [
        f"{key} {p}" for key, precisions in artifacts.items() for p in precisions if p in get_format(key).calibrated
    ]


def float_layer_files() -> tuple[str, ...]:
    """The quantized files that can keep layers in float, as ``"<format>-<precision>"`` (``float_layers`` keys)."""
    return tuple(f"{f.name}-{p}" for f in list_formats() for p in f.float_layers)


# --------------------------------------------------------------------------- the keys of earlier releases

#: The release that stops accepting the per-format keys of 0.1 (``formats``, ``<format>_precisions``,
#: ``<format>_<option>``).
LEGACY_REMOVED_IN = "0.3"


def legacy_artifact_keys() -> dict[str, tuple[str, str | None]]:
    """The per-format keys of 0.1 -> (format, option or ``None`` for its precisions), derived from the registry."""
    keys: dict[str, tuple[str, str | None]] = {}
    for fmt in list_formats():
        keys[f"{fmt.name}_precisions"] = (fmt.name, None)
        for option in fmt.options:
            keys[f"{fmt.name}_{option.name}"] = (fmt.name, option.name)
    return keys


def artifacts_from_arguments(
    artifacts: Any,
    options: Mapping[str, Mapping[str, Any]] | None,
    legacy: Mapping[str, Any],
    where: str,
    none_is_unset: bool = True,
) -> tuple[Any, dict[str, dict[str, Any]] | None]:
    """``artifacts`` and ``options`` with the keys of 0.1 in ``legacy`` folded in (``formats=[...]``,
    ``executorch_precisions=[...]``, ``executorch_attention=...``): one deprecation warning names the new form.
    Unknown keys are refused. With ``none_is_unset`` a ``None`` value is a key not given (the default of the keys
    :func:`legacy_artifact_parameters` declares, which a parser passes for every unset one); else it is checked."""
    given = {key: value for key, value in legacy.items() if value is not None or not none_is_unset}
    keys = legacy_artifact_keys()
    unknown = [key for key in given if key != "formats" and key not in keys]
    if unknown:
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}")
    if not given:
        return artifacts, None if options is None else dict(options)
    if isinstance(artifacts, str) or (isinstance(artifacts, Sequence) and not isinstance(artifacts, Mapping)):
        given.setdefault("formats", artifacts)  # the 0.1 positional ``formats`` beside per-format keys
    elif artifacts is not None:
        raise invalid(
            "artifacts", artifacts, f"alone: it replaces {', '.join(sorted(given))} (give one form, not both)"
        )
    named = validate_formats(given["formats"]) if "formats" in given else format_names(default_only=True)
    new_artifacts: dict[str, Any] = {}
    new_options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (options or {}).items()}
    for fmt_name in named:  # checked under the key the caller wrote, so the message names it
        new_artifacts[fmt_name] = get_format(fmt_name).check_precisions(
            given.get(f"{fmt_name}_precisions"), f"{fmt_name}_precisions"
        )
    for key, value in given.items():
        if key == "formats":
            continue
        fmt_name, option = keys[key]
        if option is not None:
            get_format(fmt_name).option(option).check(value, key)
            new_options.setdefault(fmt_name, {})[option] = value
    filled = {  # cross-checks under the keys the caller wrote
        fmt_name: {o.name: new_options.get(fmt_name, {}).get(o.name, o.default) for o in get_format(fmt_name).options}
        for fmt_name in new_artifacts
    }
    _check_requests(new_artifacts, filled, None)
    shown_artifacts = {k: list(v) for k, v in new_artifacts.items()}
    shown = f"artifacts={shown_artifacts}" + (f", options={new_options}" if new_options else "")
    warnings.warn(
        f"{where}: {', '.join(sorted(given))} are deprecated and will be removed in pqv-lightning "
        f"{LEGACY_REMOVED_IN}; write {shown}",
        FutureWarning,
        stacklevel=3,
    )
    return new_artifacts, new_options or None


def legacy_artifact_parameters(function: Callable) -> Callable:
    """Declare the keys of 0.1 as keyword-only parameters of ``function`` (which takes them as ``**legacy``) in its
    ``__signature__``, so that LightningCLI and jsonargparse accept them in old YAML files for one more release."""
    signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    legacy = [("formats", Sequence[str] | str | None)] + [
        (key, Sequence[str] | None if option is None else Any) for key, (_, option) in legacy_artifact_keys().items()
    ]
    params += [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for key, annotation in legacy
        if key not in names
    ]
    function.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return function


# --------------------------------------------------------------------------- loaded files


@dataclass(frozen=True)
class LoadedArtifact:
    """A file loaded in its own runtime (what :func:`pqv_lightning.export.load_artifact` returns).

    ``run(x)`` takes one input in the runtime's own array type (numpy for onnxruntime, a torch tensor for the
    others) and returns its first output; ``bind(x)`` returns the zero-argument call on that fixed input that
    latency is timed on (feeds built once, no context the runtime does not need). Both hold the runtime's
    objects for as long as they live: an ExecuTorch method must not outlive its program.
    """

    kind: str
    run: Callable[[Any], Any]
    bind: Callable[[Any], Callable[[], Any]]
    takes_numpy: bool = False

    def predict(self, x: Tensor) -> Tensor:
        """``run`` on a torch tensor, returning a tensor (imports torch: for verification and in-process timing)."""
        import torch

        if self.takes_numpy:
            return torch.from_numpy(self.run(x.detach().cpu().contiguous().numpy()))
        return torch.as_tensor(self.run(x))


# --------------------------------------------------------------------------- the registered formats

register_format(ExportFormat(
    name="torchscript", suffix=".pt", module="pqv_lightning.export.torchscript",
    precisions=("fp32", "quantized"), default_precisions=("fp32", "quantized"), from_variants=("quantized",),
    description="TorchScript (deprecated upstream; PQV-Mobile's format): the float model and, as 'quantized', each "
    "TorchScript-able variant of the quantization stage (torch.ao INT8, fp16)",
    takes_engine=True, color="#dd8452",
))  # fmt: skip
register_format(ExportFormat(
    name="lite", suffix=".ptl", module="pqv_lightning.export.torchscript",
    precisions=("fp32", "quantized"), default_precisions=("fp32", "quantized"), from_variants=("quantized",),
    description="TorchScript for the lite interpreter (PyTorch Mobile), with the same variants as torchscript",
    takes_engine=True, color="#937860",
))  # fmt: skip
register_format(ExportFormat(
    name="executorch", suffix=".pte", module="pqv_lightning.export.executorch",
    precisions=("fp32", "int8", "int8_dynamic", "int4"), default_precisions=("fp32", "int8", "int4"),
    description="ExecuTorch program lowered to XNNPACK (phones, edge): int8 static PT2E (calibrated), int8_dynamic "
    "activations, int4 weights",
    calibrated=("int8",),
    float_layers={"int8": "int8_pt2e:xnnpack", "int8_dynamic": "int8_pt2e:xnnpack", "int4": "int4_weight"},
    weight_grids={"int8": "int8_pt2e:xnnpack", "int8_dynamic": "int8_pt2e:xnnpack", "int4": "int4_weight:xnnpack"},
    options=(FormatOption("attention", ("fp32", "fp16"), "the dtype of the attention products and softmax "
                          "(fp16: native where the CPU has fp16 arithmetic)"),),
    takes_trained=True, fixed_shape=True, kernel="xnnpack", kernel_multiple=4, color="#c44e52",
))  # fmt: skip
register_format(ExportFormat(
    name="onnx", suffix=".onnx", module="pqv_lightning.export.onnx",
    precisions=("fp32", "int8", "int8_qdq"), default_precisions=("fp32", "int8"),
    description="ONNX run by onnxruntime: int8 dynamic (weights per channel), int8_qdq static (calibrated)",
    calibrated=("int8_qdq",), float_layers={"int8": "int8_dynamic", "int8_qdq": "int8_static"},
    options=(
        FormatOption("optimize", (True, False), "quantize onnxruntime's fused transformer graph"),
        FormatOption("per_channel", (True, False), "per-channel int8 weights"),
        FormatOption("reduce_range", ("auto", False, True), "7-bit int8 weights, which x86 CPUs without VNNI need "
                     "(their u8 x s8 kernels saturate on 8-bit weights); auto: on where the exporting CPU is one"),
    ),
    kernel="onnxruntime", kernel_multiple=8, color="#55a868",
))  # fmt: skip
register_format(ExportFormat(
    name="aoti", suffix=".pt2", module="pqv_lightning.export.aoti",
    precisions=("fp32", "int8"), default_precisions=("fp32", "int8"),
    description="AOTInductor package compiled for this x86 CPU (oneDNN kernels; needs a C++ compiler): int8 is PT2E "
    "x86 static (calibrated)",
    calibrated=("int8",), float_layers={"int8": "int8_pt2e:x86"}, weight_grids={"int8": "int8_pt2e:x86"},
    default=False, fixed_shape=True, kernel="onednn", kernel_multiple=4, color="#8172b3",
))  # fmt: skip

register_format(ExportFormat(
    name="openvino", suffix=".xml", module="pqv_lightning.export.openvino", companions=(".bin",),
    precisions=("fp32", "int8"), default_precisions=("fp32", "int8"),
    description="OpenVINO IR (.xml + .bin) for the OpenVINO CPU plugin (x86 edge): int8 by NNCF post-training "
    "quantization (calibrated); needs the openvino extra",
    calibrated=("int8",), default=False, fixed_shape=True, kernel="onednn", kernel_multiple=4, color="#64b5cd",
    optional="openvino",
))  # fmt: skip

#: The registered format names, and those exported when none is named (at import time; see :func:`format_names`).
FORMATS = format_names()
DEFAULT_FORMATS = format_names(default_only=True)
SUFFIXES = {f.suffix: f.name for f in list_formats()}


def iter_requests(artifacts: Mapping[str, Sequence[str]]) -> Iterable[tuple[ExportFormat, tuple[str, ...]]]:
    """``(format, precisions)`` of ``artifacts`` in registry order, formats with no precision left out."""
    for fmt in list_formats():
        if artifacts.get(fmt.name):
            yield fmt, tuple(artifacts[fmt.name])
