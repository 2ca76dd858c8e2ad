"""pqv-lightning: prune, quantize and export timm vision transformers as Lightning callbacks.

``ViTClassifier`` is imported on first use (PEP 562): a process that only loads an exported file (the fresh
processes of :mod:`pqv_lightning.export.probe`) must not pay for importing Lightning and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pqv_lightning.module import ViTClassifier

__version__ = "0.1.0"

__all__ = ["ViTClassifier", "__version__"]

_LAZY = {"ViTClassifier": "pqv_lightning.module"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
