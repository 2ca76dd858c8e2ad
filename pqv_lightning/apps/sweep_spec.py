"""What a sweep runs (:class:`SweepSpec`), read from YAML and checked in full before anything trains."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pqv_lightning.distillation import validate as validate_distillation
from pqv_lightning.export.formats import legacy_artifact_keys
from pqv_lightning.latency_search import LatencyTarget
from pqv_lightning.pipeline import ExportConfig, QuantizationConfig, ReportConfig
from pqv_lightning.pruning import PruningSpec
from pqv_lightning.tokens import TokenReduction
from pqv_lightning.utils.checks import check_choice, check_int, check_number, invalid

__all__ = ["SPEC_KEYS", "SweepSpec", "grid", "load_spec", "validate_spec"]

SPEC_KEYS = (
    "base",
    "output_dir",
    "seed",
    "dense_epochs",
    "finetune_epochs",
    "ratios",
    "importances",
    "distillation",
    "quantization",
    "export",
    "report",
    "calibration_batches",
    "latency_targets_ms",
    "latency",
    "tokens",
    "token_method",
)
_LATENCY_KEYS = ("target", "threads", "warmup", "runs", "rounds")
#: The export section's keys: the new form, then those of 0.1 (deprecated, derived from the format registry).
_EXPORT_KEYS = ("artifacts", "options", "formats", *legacy_artifact_keys())
_REPORT_KEYS = ("threads", "warmup", "runs", "batch", "memory")
#: The id suffix of the points of the tokens axis, per method.
_TOKEN_SUFFIX = {"merge": "tome", "prune": "evit"}
_DISTILLATION_KEYS = ("mode", "temperature", "alpha")


@dataclass
class SweepSpec:
    """What a sweep runs. ``base`` is a training recipe (``configs/*.yaml``) whose model and data are used."""

    base: str
    output_dir: str
    seed: int = 0
    dense_epochs: int = 25
    finetune_epochs: int = 10
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.09375, 0.25, 0.5])
    importances: list[str] = field(default_factory=lambda: ["l1", "l2", "taylor", "hessian"])
    distillation: dict[str, Any] | None = field(
        default_factory=lambda: {"mode": "soft", "temperature": 4.0, "alpha": 0.5}
    )
    quantization: list[str] = field(default_factory=lambda: ["fp16", "int8_dynamic:x86", "int8_pt2e:xnnpack"])
    export: dict[str, Any] = field(
        default_factory=lambda: {
            "artifacts": {
                "torchscript": ["fp32", "quantized"],
                "executorch": ["fp32", "int8"],
                "onnx": ["fp32", "int8"],
            }
        }
    )
    report: dict[str, Any] = field(default_factory=lambda: {"threads": 1, "runs": 30, "batch": 16, "memory": True})
    calibration_batches: int = 8
    #: Points pruned to a measured latency instead of a ratio: one per target and criterion (id ``t<ms>ms_<imp>``),
    #: the ratio searched on the dense model by timing ``latency["target"]`` files (pqv_lightning.latency_search).
    latency_targets_ms: list[float] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=lambda: {"target": "onnx-int8", "threads": 1})
    #: The token axis: tokens removed per block ``r`` (0: none); every point of the grid is run at each ``r``
    #: (id suffix ``_tome<r>`` for merging, ``_evit<r>`` for pruning), trained with the reduction from fit start.
    tokens: list[int] = field(default_factory=lambda: [0])
    #: ``"merge"`` (ToMe) or ``"prune"`` (EViT) for the ``tokens`` axis.
    token_method: str = "merge"

    def fingerprint(self) -> str:
        """What results depend on (not where they are written): finished points count only under the same."""
        doc = {k: v for k, v in asdict(self).items() if k != "output_dir"}
        doc["base_recipe"] = Path(self.base).read_text() if Path(self.base).is_file() else self.base
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def quantization_config(self) -> QuantizationConfig:
        return QuantizationConfig(tuple(self.quantization), self.calibration_batches)

    def export_config(self, output_dir: Path) -> ExportConfig:
        """The export section as a config (``artifacts`` / ``options``; the keys of 0.1 with a deprecation warning)."""
        return ExportConfig(output_dir=output_dir, calibration_batches=self.calibration_batches, **self.export)

    def latency_target(self, point_id: str) -> LatencyTarget | None:
        """The latency target of a ``t<ms>ms_<imp>`` point, ``None`` for a ratio point."""
        for ms in self.latency_targets_ms:
            if point_id.startswith(f"t{ms:g}ms_"):
                return LatencyTarget(
                    float(ms),
                    self.latency.get("target", "onnx-int8"),
                    **{k: v for k, v in self.latency.items() if k != "target"},
                )
        return None

    def token_reduction(self, point_id: str) -> TokenReduction | None:
        """The token reduction of a point (id suffix ``_tome<r>`` / ``_evit<r>``), ``None`` for ``r`` = 0."""
        suffix = f"_{_TOKEN_SUFFIX[self.token_method]}"
        _, sep, r = point_id.rpartition(suffix)
        if not sep or not r.isdigit():
            return None
        return TokenReduction(method=self.token_method, r=int(r))

    def report_config(self, output_dir: Path) -> ReportConfig:
        """Grid points are compared by the sweep itself: no dense row and no operator profile per point."""
        return ReportConfig(output_dir=output_dir, profile=None, include_dense=False, **self.report)


def _check_keys(name: str, section: Any, accepted: tuple[str, ...]) -> None:
    if not isinstance(section, dict):
        raise invalid(name, section, f"a mapping with keys among {', '.join(accepted)}")
    for key in section:
        if key not in accepted:
            raise invalid(f"{name}[{key!r}]", section[key], f"keys among {', '.join(accepted)}")


def validate_spec(spec: SweepSpec) -> SweepSpec:
    """Check every field before anything trains; raise naming the bad value and what is accepted."""
    if not Path(spec.base).is_file():
        raise invalid("base", spec.base, "the path of an existing recipe file, e.g. configs/quickstart.yaml")
    check_int("seed", spec.seed, 0)
    check_int("dense_epochs", spec.dense_epochs, 1)
    check_int("finetune_epochs", spec.finetune_epochs, 1)
    check_int("calibration_batches", spec.calibration_batches, 1)
    if not spec.ratios or not isinstance(spec.ratios, list):
        raise invalid("ratios", spec.ratios, "a non-empty list of numbers in [0, 1)")
    for i, ratio in enumerate(spec.ratios):
        check_number(f"ratios[{i}]", ratio, 0, 1, max_open=True)
    if not isinstance(spec.latency_targets_ms, list):
        raise invalid("latency_targets_ms", spec.latency_targets_ms, "a list of latencies in ms (may be empty)")
    for i, ms in enumerate(spec.latency_targets_ms):
        check_number(f"latency_targets_ms[{i}]", ms, 0, min_open=True, accepted="a positive number of ms")
    _check_keys("latency", spec.latency, _LATENCY_KEYS)
    check_choice("token_method", spec.token_method, tuple(_TOKEN_SUFFIX))
    if not isinstance(spec.tokens, list) or not spec.tokens:
        raise invalid("tokens", spec.tokens, "a non-empty list of tokens removed per block (ints >= 0; 0: none)")
    for i, r in enumerate(spec.tokens):
        TokenReduction(method=spec.token_method, r=check_int(f"tokens[{i}]", r, 0))
    if len(set(spec.tokens)) != len(spec.tokens):
        raise invalid("tokens", spec.tokens, "each r once")
    for ms in spec.latency_targets_ms:
        spec.latency_target(f"t{ms:g}ms_")  # raises naming a bad target kind or thread count
    if any(r > 0 for r in spec.ratios) or spec.latency_targets_ms:
        if not spec.importances or not isinstance(spec.importances, list):
            accepted = "a non-empty list: ratios > 0 and latency targets need a criterion"
            raise invalid("importances", spec.importances, accepted)
        for importance in spec.importances:
            PruningSpec(ratio=0.5, importance=importance)  # raises naming the accepted criteria
    if spec.distillation is not None:
        _check_keys("distillation", spec.distillation, _DISTILLATION_KEYS)
        d = {"mode": "soft", "temperature": 4.0, "alpha": 0.5, **spec.distillation}
        validate_distillation(d["mode"], d["temperature"], d["alpha"])
    spec.quantization_config()
    _check_keys("export", spec.export, _EXPORT_KEYS)
    spec.export_config(Path(spec.output_dir))
    _check_keys("report", spec.report, _REPORT_KEYS)
    spec.report_config(Path(spec.output_dir))
    return spec


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a sweep YAML (keys of :class:`SweepSpec`; ``base`` relative to the YAML's folder's parent if needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {str(path)!r} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"sweep config {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"sweep config {str(path)!r} must be a mapping of {', '.join(SPEC_KEYS)}")
    doc.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in doc:
        if key not in SPEC_KEYS:
            raise invalid(key, doc[key], f"a key of sweep config {str(path)!r}: {', '.join(SPEC_KEYS)}")
    for key in ("base", "output_dir"):
        if key not in doc:
            raise ValueError(f"sweep config {str(path)!r} lacks {key!r}")
    base = Path(doc["base"])
    if not base.is_absolute() and not base.is_file() and (path.parent.parent / base).is_file():
        doc["base"] = str(path.parent.parent / base)
    return validate_spec(SweepSpec(**doc))


def grid(spec: SweepSpec) -> list[tuple[str, float | None, str | None]]:
    """``(id, ratio, importance)`` per grid point; ratio 0 (no pruning) is one point whatever the criteria; a
    latency point (``t<ms>ms_<imp>``) has ratio ``None``: it is searched when the point runs. With a ``tokens``
    axis, every point is repeated for each ``r`` > 0 with the suffix ``_tome<r>`` (:meth:`SweepSpec.token_reduction`
    reads it back)."""
    points: list[tuple[str, float | None, str | None]] = []
    for ratio in spec.ratios:
        if ratio == 0:
            points.append(("dense", 0.0, None))
        else:
            points += [(f"r{ratio:g}_{imp}", float(ratio), imp) for imp in spec.importances]
    for ms in spec.latency_targets_ms:
        points += [(f"t{ms:g}ms_{imp}", None, imp) for imp in spec.importances]
    suffix = _TOKEN_SUFFIX[spec.token_method]
    return [(f"{pid}_{suffix}{r}" if r else pid, ratio, imp) for r in spec.tokens for pid, ratio, imp in points]
