"""The fit-end chain without Lightning: quantize -> export -> measure and report, in that order, once.

Three frozen configs say what each stage does (:class:`QuantizationConfig`, :class:`ExportConfig`,
:class:`ReportConfig`); :func:`run_pipeline` runs the stages that have a config on a trained model with its
validation (and calibration) data, and returns everything they produced in one :class:`PipelineResult`. A stage
that fails is recorded there and the later stages go on with what there is: at the end of a long fit nothing
already produced may be lost to a later failure.

One module per stage (:mod:`~.quantize`, :mod:`~.export`, :mod:`~.report`: the config beside the stage), what they
share (:mod:`~.data`), and the run (:mod:`~.run`). The Lightning callbacks
:class:`~pqv_lightning.callbacks.Quantization`, :class:`~pqv_lightning.callbacks.MobileExport` and
:class:`~pqv_lightning.callbacks.TradeoffReport` each hold one config, and the first of them to reach fit end runs
this chain for all of them; ``pqv-export`` and ``pqv-sweep`` call it directly.
"""

from pqv_lightning.pipeline.data import CALIBRATION_SPLITS
from pqv_lightning.pipeline.export import (
    MANIFEST_NAME,
    ExportConfig,
    ExportOutcome,
    artifacts_table,
    export_float_layers,
    export_stage,
)
from pqv_lightning.pipeline.quantize import QuantizationConfig
from pqv_lightning.pipeline.report import ReportConfig
from pqv_lightning.pipeline.run import PipelineResult, run_pipeline

__all__ = [
    "CALIBRATION_SPLITS",
    "MANIFEST_NAME",
    "ExportConfig",
    "ExportOutcome",
    "PipelineResult",
    "QuantizationConfig",
    "ReportConfig",
    "artifacts_table",
    "export_float_layers",
    "export_stage",
    "run_pipeline",
]
