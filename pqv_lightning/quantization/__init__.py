"""Quantization engine: FP16, INT8 per CPU backend (torch.ao and PT2E), INT4 weights; mixed precision and QAT.

``targets`` says what can be built, ``ptq`` builds it, ``evaluation`` measures it against the float model;
``layers`` names what a method quantizes (and what stays float), ``sensitivity`` measures each layer's share of
the error, ``mixed_precision`` chooses float layers by budget, ``qat`` trains through fake quantization;
``smoothing`` moves activation outliers into the weights (exact in float), ``rounding`` rounds weights by GPTQ.
"""

from pqv_lightning.quantization.evaluation import (
    QuantizationResult,
    evaluate,
    quantize_and_evaluate,
    results_table,
    top1_agreement,
)
from pqv_lightning.quantization.layers import GRANULARITIES, block_of, quantizable_layers, resolve_float_layers, units
from pqv_lightning.quantization.mixed_precision import (
    BudgetNotMetError,
    MixedPrecision,
    MixedPrecisionPlan,
    plan_float_layers,
)
from pqv_lightning.quantization.ptq import (
    EngineScoped,
    HalfPrecision,
    QuantizedModel,
    export_for_pt2e,
    int4_granularities,
    pt2e_quantizer,
    quantize,
    quantize_pt2e,
    quantized_engine,
)
from pqv_lightning.quantization.qat import (
    QAT_TARGETS,
    check_qat_target,
    convert_qat,
    float_weights,
    prepare_qat,
    quantization_state,
    set_observers,
)
from pqv_lightning.quantization.rounding import GRIDS, ROUNDINGS, RoundingResult, WeightGrid, grid_for, round_weights
from pqv_lightning.quantization.sensitivity import (
    LogitReference,
    SensitivityAnalysis,
    UnitSensitivity,
    analyze_sensitivity,
    logit_metrics,
)
from pqv_lightning.quantization.smoothing import SmoothingResult, find_couplings, smooth_outliers
from pqv_lightning.quantization.targets import (
    CALIBRATED_METHODS,
    LEGACY_ENGINES,
    METHODS,
    PT2E_BACKENDS,
    QuantizationTarget,
    installed_legacy_engines,
    parse_targets,
    supported_targets,
)

__all__ = [
    "CALIBRATED_METHODS",
    "GRANULARITIES",
    "GRIDS",
    "LEGACY_ENGINES",
    "METHODS",
    "PT2E_BACKENDS",
    "QAT_TARGETS",
    "ROUNDINGS",
    "BudgetNotMetError",
    "EngineScoped",
    "HalfPrecision",
    "LogitReference",
    "MixedPrecision",
    "MixedPrecisionPlan",
    "QuantizationResult",
    "QuantizationTarget",
    "QuantizedModel",
    "RoundingResult",
    "SensitivityAnalysis",
    "SmoothingResult",
    "UnitSensitivity",
    "WeightGrid",
    "analyze_sensitivity",
    "block_of",
    "check_qat_target",
    "convert_qat",
    "evaluate",
    "export_for_pt2e",
    "find_couplings",
    "float_weights",
    "grid_for",
    "installed_legacy_engines",
    "int4_granularities",
    "logit_metrics",
    "parse_targets",
    "plan_float_layers",
    "prepare_qat",
    "pt2e_quantizer",
    "quantizable_layers",
    "quantization_state",
    "quantize",
    "quantize_and_evaluate",
    "quantize_pt2e",
    "quantized_engine",
    "resolve_float_layers",
    "results_table",
    "round_weights",
    "set_observers",
    "smooth_outliers",
    "supported_targets",
    "top1_agreement",
    "units",
]
