"""Lightning callbacks of pqv-lightning (installed as ``pqv_lightning.callbacks``).

Two bases say how they fit into a Lightning run: :class:`ShapeChangingCallback` (callbacks that change parameter
shapes mid-fit: resume, optimizers, DDP, the model before the change) and :class:`FitEndCallback` (the fit-end
chain quantize -> export -> report, run once whatever the callback order).
"""

from pqv_lightning.callbacks.checkpoints import LastCheckpoint
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.export import MobileExport
from pqv_lightning.callbacks.fit_end import FitEndCallback
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.qat import QuantizationAwareTraining
from pqv_lightning.callbacks.quantization import Quantization
from pqv_lightning.callbacks.report import TradeoffReport
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback
from pqv_lightning.callbacks.sparsity_gates import SparsityGates
from pqv_lightning.callbacks.token_merging import TokenMerging

__all__ = [
    "FitEndCallback",
    "KnowledgeDistillation",
    "LastCheckpoint",
    "MobileExport",
    "Quantization",
    "QuantizationAwareTraining",
    "ShapeChangingCallback",
    "SparsityGates",
    "StructuredPruning",
    "TokenMerging",
    "TradeoffReport",
]
