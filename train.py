"""Train, prune, quantize and export a timm ViT: ``python train.py fit --config configs/quickstart.yaml``."""

from pqv_lightning.cli import main

if __name__ == "__main__":
    main()
