"""Lightning callbacks of pqv-lightning (installed as ``pqv_lightning.callbacks``)."""

from pqv_lightning.callbacks.pruning import StructuredPruning

__all__ = ["StructuredPruning"]
