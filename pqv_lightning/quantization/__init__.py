"""Post-training quantization engine: FP16, INT8 per CPU backend (torch.ao and PT2E), and INT4 weights.

``targets`` says what can be built, ``ptq`` builds it, ``evaluation`` measures it against the float model.
"""

from pqv_lightning.quantization.evaluation import (
    QuantizationResult,
    evaluate,
    quantize_and_evaluate,
    results_table,
    top1_agreement,
)
from pqv_lightning.quantization.ptq import (
    EngineScoped,
    HalfPrecision,
    QuantizedModel,
    quantize,
    quantize_pt2e,
    quantized_engine,
)
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
    "LEGACY_ENGINES",
    "METHODS",
    "PT2E_BACKENDS",
    "EngineScoped",
    "HalfPrecision",
    "QuantizationResult",
    "QuantizationTarget",
    "QuantizedModel",
    "evaluate",
    "installed_legacy_engines",
    "parse_targets",
    "quantize",
    "quantize_and_evaluate",
    "quantize_pt2e",
    "quantized_engine",
    "results_table",
    "supported_targets",
    "top1_agreement",
]
