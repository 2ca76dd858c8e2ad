"""``TokenMerging``: ToMe token merging (or EViT token pruning) in a Lightning fit, trained with or off the shelf."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from pqv_lightning.callbacks._utils import search_on_rank_zero, timm_model_of
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback
from pqv_lightning.checkpoint import TOKENS_KEY, current_structure
from pqv_lightning.latency_search import LatencyTarget, TokenSearch, search_tokens
from pqv_lightning.pruning import PruningSpec
from pqv_lightning.tokens import (
    REDUCED_CLASSES,
    TokenReduction,
    apply_token_reduction,
    check_token_reduction,
    is_token_reduced,
    remove_token_reduction,
    token_reduction_of,
    tokens_per_block,
)
from pqv_lightning.utils.checks import check_identifier, check_int, invalid
from pqv_lightning.utils.progress import Progress

__all__ = ["TokenMerging", "check_one_latency_knob"]


class TokenMerging(Callback):
    """Fewer tokens per block: ToMe's bipartite soft matching (``method="merge"``) or EViT's inattentive-token
    fusion (``method="prune"``), ``r`` tokens fewer in every block (:mod:`pqv_lightning.tokens`).

    When: ``at_epoch=K`` trains with the reduction from the start of epoch K (ToMe's "trained with" setting; 0:
    from the first step) to the end of the fit; ``at_epoch=None`` trains without it and applies it at train end,
    before the fit-end chain (ToMe's "off the shelf"): :class:`Quantization`, :class:`MobileExport` and
    :class:`TradeoffReport` then quantize, export and measure the reducing model, whatever the callback order. The
    model's parameters are untouched, so optimizers, schedulers and DDP carry on as they are; the epochs before K
    and the sanity check run without it, and so does the model the other callbacks capture at fit start (the
    distillation teacher, the report's dense model).

    Stacks with :class:`StructuredPruning` in either order (pruning traces the reducing forward and gives the
    same network; merging works at any width), :class:`KnowledgeDistillation`, and
    :class:`QuantizationAwareTraining` when the reduction starts no later than the fake quantization (which
    exports the model as it is then).

    Checkpoints: a checkpoint of the reducing model holds its settings as plain data (``pqv_token_reduction``), so
    ``ViTClassifier.from_checkpoint``, ``pqv-export`` (``load_classifier_checkpoint``) and a resumed fit rebuild
    it without this callback's arguments; during a fit this callback decides (a resumed fit before epoch K trains
    without it again). Its summary (settings, tokens per block, when applied) is its checkpoint state.

    Supported: timm ``VisionTransformer`` (ViT, DeiT incl. distilled, DeiT III, register tokens, DINOv2 layer scale,
    qk-norm) and ``Cait``; anything else is refused in ``setup``, before training, with the reason
    (:func:`pqv_lightning.tokens.check_token_reduction`).

    ``r`` is a latency knob: ``target_latency_ms`` (with ``r=None``) searches the smallest ``r`` whose exported
    ``latency_target`` file runs within it on this CPU, before any training (rank 0 times, the others wait; the
    search is kept in the checkpoint state). With :class:`StructuredPruning` one knob is searched and the other is
    applied while measuring: a pruning latency target measures its trials reducing tokens at this ``r``; this
    target measures its trials pruned at the pruning ratio (or on the model pruned at fit start). Both with a target
    is refused in ``setup``.

    Args:
        r: tokens removed per block (before the schedule); ToMe's DeiT-S setting is 13 at 224 px. ``None`` with
            ``target_latency_ms``: searched.
        method: ``"merge"`` (ToMe) or ``"prune"`` (EViT; needs a class token).
        schedule: ``"constant"``, ``"decreasing"`` (from ``2r`` to 0), or a list of ints, one per block.
        at_epoch: epoch from which the fit trains with the reduction (0: all of it), or ``None``: only at train end.
        proportional_attention: add ``log(size)`` to the attention logits; ``None``: on for merge, off for prune.
        model_attribute: attribute of the LightningModule holding the timm model.
        target_latency_ms: reduce tokens until the exported ``latency_target`` file runs within this many ms per call
            at batch 1 on this CPU (``r`` is then searched); an unreachable target is refused before training.
        latency_target: the artifact the latency is measured on, ``"<format>-<precision>"`` or ``"eager"`` (as for
            :class:`StructuredPruning`).
        threads: runtime threads the latency is measured at.

    Raises:
        InvalidArgumentError: at construction, a bad value (``r`` and ``target_latency_ms`` both or neither given);
            in ``setup``, a model the reduction cannot take, an ``at_epoch`` no epoch reaches, a latency target on
            both knobs, or an unreachable one.

    Example::

        Trainer(callbacks=[StructuredPruning(ratio=0.25), TokenMerging(r=13, at_epoch=0), MobileExport()])
        Trainer(callbacks=[TokenMerging(r=None, target_latency_ms=12.0, latency_target="executorch-int8")])
    """

    def __init__(
        self,
        r: int | None = 8,
        method: str = "merge",
        schedule: str | list[int] = "constant",
        at_epoch: int | None = 0,
        proportional_attention: bool | None = None,
        model_attribute: str = "model",
        target_latency_ms: float | None = None,
        latency_target: str = "onnx-int8",
        threads: int = 1,
    ) -> None:
        super().__init__()
        #: the latency target ``r`` is searched for (``None``: ``r`` is given)
        self.latency: LatencyTarget | None = None
        if target_latency_ms is not None:
            if r is not None:
                raise invalid("r", r, f"None with target_latency_ms={target_latency_ms!r} (r is then searched)")
            self.latency = LatencyTarget(target_latency_ms, latency_target, check_int("threads", threads, 1))
        elif r is None:
            raise invalid("r", r, "tokens removed per block (an int >= 0), or None with a target_latency_ms")
        self.spec = TokenReduction(
            method=method, r=0 if r is None else r, schedule=schedule, proportional_attention=proportional_attention
        )
        #: The latency search's outcome (``target_latency_ms``), kept in the checkpoint state as plain data.
        self.latency_search: TokenSearch | None = None
        self.at_epoch = check_int(
            "at_epoch", at_epoch, 0, allow_none=True,
            accepted="an epoch (an int >= 0) to train with it from, or None to apply it at train end only",
        )  # fmt: skip
        self.model_attribute = check_identifier(
            "model_attribute", model_attribute, "the name of the LightningModule attribute holding the timm model"
        )
        #: Plain data: the settings, ``tokens_per_block`` and ``applied_at`` (an epoch, or ``"train_end"``);
        #: ``None`` until the reduction is applied (kept in the checkpoint state, so a resumed fit still has it).
        self.summary: dict[str, Any] | None = None
        self._latency_trials: dict[int, float] = {}

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        check_token_reduction(model, self.spec)
        if stage != "fit":
            return
        if self.latency is not None:
            check_one_latency_knob(trainer)
            if self.latency_search is None:
                self._search_latency(trainer, model)
        max_epochs = trainer.max_epochs
        if self.at_epoch and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise invalid(
                "at_epoch",
                self.at_epoch,
                f"an int in [0, {max_epochs - 1}] (max_epochs={max_epochs}: no epoch would train with it), or None "
                "to apply it at train end only",
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wanted = self.at_epoch is not None and trainer.current_epoch >= self.at_epoch
        self._set(trainer, pl_module, wanted, trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch is None:
            self._set(trainer, pl_module, True, "train_end")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        model = getattr(pl_module, self.model_attribute, None)
        spec = token_reduction_of(model) if isinstance(model, nn.Module) else None
        if spec is not None:
            checkpoint[TOKENS_KEY] = spec.as_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"spec": self.spec.as_dict(), "at_epoch": self.at_epoch, "summary": dict(self.summary or {})}
        if self.latency_search is not None:
            state["latency_search"] = self.latency_search.as_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        summary = state_dict.get("summary")
        if summary and self.summary is None:
            self.summary = dict(summary)
        stored = state_dict.get("latency_search")
        if self.latency is not None and stored and self.latency_search is None:
            search = TokenSearch.from_dict(stored)
            if search.target == self.latency:  # the same target: its measurements and choice hold
                self._adopt(search)

    # ------------------------------------------------------------------ internals
    def _search_latency(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """``r`` for ``target_latency_ms``, found on rank 0 by timing reducing copies (the others wait) and
        broadcast; an unreachable target is refused before any training step."""
        outcome = search_on_rank_zero(
            trainer,
            lambda example, calibration: search_tokens(
                model,
                self.spec,
                example,
                self.latency,
                calibration,
                trials=self._latency_trials,
                progress=Progress("TokenMerging"),
                pruning=_pending_pruning(trainer, model),
            ).as_dict(),
        )
        search = self._adopt(TokenSearch.from_dict(outcome))
        rank_zero_info(
            f"TokenMerging: target {search.target.target_ms:g} ms for {search.target.describe()}: r={search.r} "
            f"measured {search.latency_ms:.3f} ms ({len(search.trials)} trials)"
        )

    def _adopt(self, search: TokenSearch) -> TokenSearch:
        """Reduce ``search.r`` tokens per block from now on; its trials join the cache."""
        self._latency_trials.update(search.trials)
        self.latency_search = search
        self.spec = replace(self.spec, r=search.r)
        return search

    def _set(self, trainer: pl.Trainer, pl_module: pl.LightningModule, wanted: bool, when: int | str) -> None:
        """Make the model reduce tokens with this callback's spec (``wanted``) or not."""
        model = getattr(pl_module, self.model_attribute, None)
        if not isinstance(model, tuple(REDUCED_CLASSES)):
            return  # replaced by another callback's model (QAT's fake-quantized graph, exported as it was)
        if not wanted:
            if is_token_reduced(model):
                rank_zero_warn(
                    f"TokenMerging: the model reduced tokens ({token_reduction_of(model).describe()}: applied before "
                    f"this fit, or by the resumed checkpoint) before at_epoch={self.at_epoch}; it trains without the "
                    "reduction until then."
                )
                remove_token_reduction(model)
            return
        if token_reduction_of(model) == self.spec:
            return
        if is_token_reduced(model):
            rank_zero_warn(
                f"TokenMerging: the model's reduction ({token_reduction_of(model).describe()}) is replaced by this "
                f"callback's ({self.spec.describe()})."
            )
        apply_token_reduction(model, self.spec)
        counts = tokens_per_block(model)
        self.summary = {**self.spec.as_dict(), "tokens_per_block": counts, "applied_at": when}
        if not trainer.is_global_zero:
            return
        rank_zero_info(
            f"TokenMerging: {self.spec.describe()} from {'train end' if when == 'train_end' else f'epoch {when}'}: "
            f"tokens per block {' -> '.join(map(str, counts))}"
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {"tokens/first_block": float(counts[0]), "tokens/last_block": float(counts[-1])},
                step=trainer.global_step,
            )


def _pending_pruning(trainer: pl.Trainer, model: nn.Module) -> tuple[PruningSpec, float] | None:
    """The fixed-ratio pruning a shape-changing callback of this fit has still to apply (at epoch K, or later in the
    callback list than this one): the token search prunes its trial copies so. ``None`` when the model is pruned
    already (at fit start, earlier in the list) or nothing prunes at a fixed ratio."""
    if current_structure(model) is not None:
        return None
    for callback in trainer.callbacks:
        spec = getattr(callback, "spec", None)
        if isinstance(callback, ShapeChangingCallback) and isinstance(spec, PruningSpec) and spec.ratio:
            return spec, float(spec.ratio)
    return None


def check_one_latency_knob(trainer: pl.Trainer) -> None:
    """Refuse a fit whose pruning and token merging both have a latency target (before anything is measured): one
    knob is searched, the other is applied while measuring."""
    pruning = [cb for cb in trainer.callbacks if isinstance(cb, ShapeChangingCallback) and getattr(cb, "latency", None)]
    merging = [cb for cb in trainer.callbacks if isinstance(cb, TokenMerging) and cb.latency is not None]
    if pruning and merging:
        raise invalid(
            "target_latency_ms",
            merging[0].latency.target_ms,
            f"a latency target on one knob only: {type(pruning[0]).__name__} prunes channels to a latency too; give "
            "it a ratio and search r in TokenMerging, or give TokenMerging an r (the pruning trials then reduce "
            "tokens so)",
        )
