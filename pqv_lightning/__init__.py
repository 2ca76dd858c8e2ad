"""pqv-lightning: prune, quantize and export timm vision transformers as Lightning callbacks."""

from pqv_lightning.module import ViTClassifier

__version__ = "0.1.0"

__all__ = ["ViTClassifier", "__version__"]
