"""Does a file compute the model's function? Its runtime's outputs against the eager float model's.

Every artifact is exported for the fixed input shape of ``example_input``. Verification cuts each validation
batch into pieces of that batch size; a short last piece is padded by repeating its last image and the padded
rows are dropped from the results (a ViT in eval mode treats samples independently, so padding does not change
the real rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pqv_lightning.utils.checks import check_number, invalid

__all__ = ["ReferencePiece", "VerifyThresholds", "reference_pieces", "verify_outputs"]


@dataclass(frozen=True)
class VerifyThresholds:
    """Pass/fail limits for an exported artifact, measured against the eager float model.

    Full-precision artifacts must agree on every top-1 prediction and stay within ``fp32_max_abs_diff`` of
    the eager logits; reduced-precision ones (fp16, int8, int4) must agree on at least
    ``quantized_min_agreement``.
    """

    fp32_min_agreement: float = 1.0
    fp32_max_abs_diff: float = 1e-3
    quantized_min_agreement: float = 0.97

    def __post_init__(self) -> None:
        check_number("fp32_min_agreement", self.fp32_min_agreement, 0.0, 1.0)
        check_number("quantized_min_agreement", self.quantized_min_agreement, 0.0, 1.0)
        diff = self.fp32_max_abs_diff
        if isinstance(diff, bool) or not isinstance(diff, (int, float)) or not diff > 0:
            raise invalid("fp32_max_abs_diff", diff, "a number > 0 (inf: no limit)")


@dataclass
class ReferencePiece:
    """One export-sized batch of validation images (padded), its labels and the eager model's logits."""

    images: Tensor  # [B_export, C, H, W]
    n_real: int
    labels: Tensor
    ref_logits: Tensor


def reference_pieces(model: nn.Module, val_batches: Sequence, batch_size: int) -> list[ReferencePiece]:
    """Cut ``val_batches`` into pieces of ``batch_size`` images and run the eager model on each once."""
    pieces = []
    with torch.inference_mode():
        for images, labels in val_batches:
            for start in range(0, images.shape[0], batch_size):
                real = images[start : start + batch_size].float().contiguous()
                n = real.shape[0]
                if n < batch_size:
                    real = torch.cat([real, real[-1:].expand(batch_size - n, *real.shape[1:])]).contiguous()
                ref = model(real)[:n].float()
                pieces.append(ReferencePiece(real, n, labels[start : start + batch_size], ref))
    return pieces


def verify_outputs(
    run: Callable[[Tensor], Tensor],
    pieces: Sequence[ReferencePiece],
    precision: str,
    thresholds: VerifyThresholds,
    eager_variant: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, float], str | None]:
    """Run ``run`` on every piece; return metrics, extra metrics and why it fails (None if it passes).

    With ``eager_variant`` (the quantized eager module a file was made from), also how often the file agrees
    with it: whether serialisation was faithful, apart from what quantization itself changed.
    """
    agree = total = correct1 = correct5 = 0
    variant_agree = 0
    max_diff = 0.0
    for p in pieces:
        out = torch.as_tensor(run(p.images)).detach().float()[: p.n_real]
        if out.shape != p.ref_logits.shape:
            return {}, {}, f"runtime output shape {list(out.shape)} != eager {list(p.ref_logits.shape)}"
        if not torch.isfinite(out).all():
            return {}, {}, "runtime produced non-finite logits"
        max_diff = max(max_diff, (out - p.ref_logits).abs().max().item())
        pred = out.argmax(1)
        agree += (pred == p.ref_logits.argmax(1)).sum().item()
        correct1 += (pred == p.labels).sum().item()
        topk = out.topk(min(5, out.shape[1]), dim=1).indices
        correct5 += (topk == p.labels[:, None]).any(1).sum().item()
        total += p.n_real
        if eager_variant is not None:
            with torch.inference_mode():
                variant_pred = eager_variant(p.images)[: p.n_real].float().argmax(1)
            variant_agree += (pred == variant_pred).sum().item()
    metrics = {
        "top1_agreement": agree / total,
        "max_abs_logit_diff": max_diff,
        "val_top1": correct1 / total,
        "val_top5": correct5 / total,
    }
    extra = {"verified_images": total}
    if eager_variant is not None:
        extra["eager_variant_top1_agreement"] = variant_agree / total
    return metrics, extra, _failure(metrics, precision, thresholds)


def _failure(metrics: dict[str, float], precision: str, thresholds: VerifyThresholds) -> str | None:
    agreement, max_diff = metrics["top1_agreement"], metrics["max_abs_logit_diff"]
    if precision == "fp32":
        if agreement < thresholds.fp32_min_agreement:
            return f"top-1 agreement {agreement:.4f} < {thresholds.fp32_min_agreement} with the eager model"
        if max_diff > thresholds.fp32_max_abs_diff:
            return f"max |logit diff| {max_diff:.3g} > {thresholds.fp32_max_abs_diff}"
    elif agreement < thresholds.quantized_min_agreement:
        return f"top-1 agreement {agreement:.4f} < {thresholds.quantized_min_agreement} with the eager float model"
    return None
