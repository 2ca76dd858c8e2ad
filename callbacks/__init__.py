"""Lightning callbacks of pqv-lightning (installed as ``pqv_lightning.callbacks``)."""

from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.export import MobileExport
from pqv_lightning.callbacks.pruning import StructuredPruning
from pqv_lightning.callbacks.quantization import Quantization
from pqv_lightning.callbacks.report import TradeoffReport
from pqv_lightning.callbacks.sparsity_gates import SparsityGates

__all__ = [
    "KnowledgeDistillation",
    "MobileExport",
    "Quantization",
    "SparsityGates",
    "StructuredPruning",
    "TradeoffReport",
]
