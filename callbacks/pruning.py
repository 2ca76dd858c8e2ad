"""``StructuredPruning``: structured pruning of a timm vision transformer (any supported family) in a Lightning fit."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from pqv_lightning.callbacks._utils import (
    check_epochs_fit_max_steps,
    search_on_rank_zero,
    take_batches,
    train_loader,
)
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback
from pqv_lightning.callbacks.token_merging import TokenMerging, check_one_latency_knob
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure, restore_pruned_structure
from pqv_lightning.export.widths import resolve_round_to
from pqv_lightning.latency_search import LatencySearch, LatencyTarget, search_ratio
from pqv_lightning.pruning import PruningResult, PruningSpec, apply_structure, check_budget, check_supported, prune
from pqv_lightning.tokens import TokenReduction
from pqv_lightning.utils.checks import check_callable, check_int
from pqv_lightning.utils.progress import Progress

__all__ = ["StructuredPruning"]


class StructuredPruning(ShapeChangingCallback):
    """Structured pruning with torch-pruning's dependency graph, at fit start or after ``at_epoch`` epochs.

    ``ratio`` has one meaning: torch-pruning's ``pruning_ratio``, the fraction of channels removed in each
    prunable group (uniform pruning: in every group; ``global_pruning``: on average, ranked across groups). The
    defaults (uniform L2, head dimensions pruned with heads kept, embedding width pruned, classifier kept) give
    the network torch-pruning's own ViT pruning gives for the same ratio and criterion.

    When: ``at_epoch=0`` (default) prunes in ``setup``, before Lightning creates the optimizers and wraps DDP,
    so neither ever sees a dense parameter. ``at_epoch=K`` trains K dense epochs and prunes at the start of epoch
    K (of a resumed run too), so the checkpoints and scores of the dense epochs are the dense model's; every
    optimizer then holds the pruned parameters in place of the replaced ones (their moments restart), LR
    schedulers continue unchanged, and DDP is re-wrapped.
    Under DDP, gradient statistics (Taylor, Hessian) are averaged over ranks, rank 0 decides, and every rank
    replays rank 0's structure, so all ranks hold the identical network.

    The structure is saved in every checkpoint as plain data, the summary of the pruning in this callback's state.
    Resuming (``trainer.fit(ckpt_path=...)``) or ``ViTClassifier.load_from_checkpoint`` rebuilds the structure
    before the weights load, without recomputing importance. Works on any LightningModule that exposes its timm
    model as ``model`` (or ``model_attribute``), for every family in ``pqv_lightning.pruning.FAMILIES`` (what each
    prunes: its ``description``); a model no family handles is refused in ``setup``, before training. The dense
    model just before pruning is published to ``before_shape_change`` (the default teacher of
    :class:`KnowledgeDistillation`, the report's dense row).

    Args:
        ratio: fraction of channels removed per prunable group, in [0, 1). ``None`` with a budget.
        importance: ``"l1"``, ``"l2"`` (Frobenius norm of each channel's weights), ``"taylor"``, ``"hessian"``,
            ``"random"``, ``"lamp"``, ``"fpgm"``, ``"obdc"``, ``"activation"`` (torch-pruning's criteria, see
            :mod:`pqv_lightning.pruning.importances`), or a ``torch_pruning.importance.Importance`` object.
        global_pruning: rank channels across all groups instead of pruning each group by ``ratio``.
        bottleneck: prune only inside attention and MLP blocks, keeping the embedding width.
        prune_heads: remove whole attention heads instead of head dimensions.
        ignored_layers: module names (of the timm model) to leave alone; the classifier always is.
        round_to: round kept channel counts down to a multiple (hardware-friendly widths); ``"auto"``: the multiple
            the int8 kernels of ``latency_target`` run fastest (:func:`pqv_lightning.export.widths.kernel_multiple`,
            measured by ``benchmarks/width_tiles.py``).
        target_macs: prune until the model has at most this many MACs (the ratio is searched).
        target_params: prune until the model has at most this many parameters.
        calibration_batches: training batches whose gradients score channels for Taylor / Hessian.
        at_epoch: 0 prunes at fit start; K > 0 prunes after K dense epochs (< ``max_epochs``; with ``max_steps``,
            the K epochs must end before the last step).
        model_attribute: attribute of the LightningModule holding the timm model.
        loss_fn: loss of ``(logits, labels)`` for Taylor / Hessian / OBD-C.
        isomorphic: torch-pruning's isomorphic pruning (ECCV 2024): rank together the groups of the same structure
            (e.g. all MLP hidden groups), ``ratio`` overall in each.
        target_latency_ms: prune until the exported ``latency_target`` file runs within this many ms per call on
            this machine (``ratio=None``). The ratio is searched before the first training step (in ``setup`` for
            ``at_epoch=0``, at fit start otherwise) by pruning copies, exporting and timing them on rank 0
            (:mod:`pqv_lightning.latency_search`); a target below what the most-pruned model reaches is refused
            there. The search and the measured latency are kept in the checkpoint state and the pruning summary.
        latency_target: the artifact the latency is measured on: ``"<format>-<precision>"`` (``"onnx-int8"``,
            ``"executorch-int8"``, ...: any format's precision; :data:`~pqv_lightning.latency_search.LATENCY_ARTIFACTS`)
            or ``"eager"``, at batch 1.
        threads: runtime threads the latency is measured at (state the same in the report to compare).
    """

    def __init__(
        self,
        ratio: float | None = 0.25,
        importance: str | tp.importance.Importance = "l2",
        global_pruning: bool = False,
        bottleneck: bool = False,
        prune_heads: bool = False,
        ignored_layers: list[str] | None = None,
        round_to: int | str | None = None,
        target_macs: float | None = None,
        target_params: float | None = None,
        calibration_batches: int = 10,
        at_epoch: int = 0,
        model_attribute: str = "model",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        isomorphic: bool = False,
        target_latency_ms: float | None = None,
        latency_target: str = "onnx-int8",
        threads: int = 1,
    ) -> None:
        self.latency = None
        if target_latency_ms is not None:
            given = [
                n
                for n, v in (("ratio", ratio), ("target_macs", target_macs), ("target_params", target_params))
                if v is not None
            ]
            if given:
                raise ValueError(
                    f"Give either {given[0]} or target_latency_ms={target_latency_ms!r}, not both; set ratio=None to "
                    "prune to a latency."
                )
            self.latency = LatencyTarget(target_latency_ms, latency_target, check_int("threads", threads, 1))
            ratio = 0.0  # replaced by the searched ratio before pruning
        self.spec = PruningSpec(
            ratio=ratio,
            importance=importance,
            global_pruning=global_pruning,
            isomorphic=isomorphic,
            bottleneck=bottleneck,
            prune_heads=prune_heads,
            ignored_layers=tuple(ignored_layers or ()),
            round_to=resolve_round_to(round_to, latency_target),
            target_macs=target_macs,
            target_params=target_params,
            calibration_batches=calibration_batches,
        )
        self.at_epoch = check_int("at_epoch", at_epoch, 0, accepted="0 (fit start) or a positive epoch count (an int)")
        super().__init__(model_attribute)
        self.loss_fn = check_callable("loss_fn", loss_fn, "a callable loss(logits, labels)")
        self.result: PruningResult | None = None
        self._dense_backup: torch.nn.Module | None = None
        #: The latency search's outcome (``target_latency_ms``), kept in the checkpoint state as plain data.
        self.latency_search: LatencySearch | None = None
        self._latency_trials: dict[float, float] = {}

    @property
    def dense_model(self) -> torch.nn.Module | None:
        """The model as it was before pruning in ``setup``, kept until fit start (for resume and teachers)."""
        return self._dense_backup

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_supported(self._model, self.spec)
        if stage != "fit" or current_structure(self._model) is not None:
            return
        max_epochs = trainer.max_epochs
        if self.at_epoch and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(
                f"at_epoch={self.at_epoch} is not before max_epochs={max_epochs}: pruning would never happen. "
                f"Accepted: 0 <= at_epoch < {max_epochs}."
            )
        self._check_budget(trainer)
        if self.latency is not None:
            check_one_latency_knob(trainer)
        if self.at_epoch == 0:
            if self.latency is not None and self.latency_search is None:
                self._search_latency(trainer)
            # A resumed fit restores its pruned structure after setup: keep the dense model until then.
            self._dense_backup = copy.deepcopy(self._model)
            self._prune(trainer, self._dense_backup, retain=True)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._dense_backup = None
        # at_epoch=K searches here, after a resumed fit restored this callback's state (and with it the search of
        # the run it resumes) and before the first training step.
        pruned = current_structure(self._model) is not None
        if self.at_epoch and self.latency is not None and self.latency_search is None and not pruned:
            self._search_latency(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch and current_structure(self._model) is None:
            check_epochs_fit_max_steps(trainer, self.at_epoch, "at_epoch", minimum=0)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At the start of epoch at_epoch, not at the end of the one before: everything that epoch's end saved
        # (checkpoints, with the validation score of the dense model) is the dense model. A fit resumed from any
        # checkpoint written before pruning also starts at epoch >= at_epoch with a dense model: it prunes here.
        if self.at_epoch and trainer.current_epoch >= self.at_epoch and current_structure(self._model) is None:
            self.change_mid_fit(trainer, pl_module, lambda: self._prune(trainer, self._model))

    @override
    def settings(self) -> dict[str, Any]:
        settings = {"spec": self.spec.to_dict(), "at_epoch": self.at_epoch}
        if self.latency_search is not None:
            settings["latency_search"] = self.latency_search.as_dict()
        return settings

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        stored = state_dict.get("latency_search")
        if self.latency is not None and stored and self.latency_search is None:
            search = LatencySearch.from_dict(stored)
            if search.target == self.latency:  # the same target: its measurements and choice hold
                self._adopt(search)

    @override
    def restore_before_weights_load(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(STRUCTURE_KEY)
        model = getattr(pl_module, self.model_attribute)
        existing = current_structure(model)
        if stored is None:
            if existing is not None and self._dense_backup is not None:
                raise ValueError(
                    "The checkpoint to resume holds a dense model, but StructuredPruning(at_epoch=0) pruned the "
                    "model at fit start. To prune trained dense weights, load them into the module first "
                    "(e.g. ViTClassifier.load_from_checkpoint) and call fit without ckpt_path, or prune later "
                    "with at_epoch=K."
                )
            return
        if existing is not None and existing != stored:
            if self._dense_backup is None:
                raise ValueError(
                    "The checkpoint's pruned structure differs from the structure this model was already "
                    "pruned to: resume into a dense module of the same configuration."
                )
            # Pruned in setup, then asked to resume another structure: start again from the dense model.
            model = self._dense_backup
            setattr(pl_module, self.model_attribute, model)
            self._model = model
        self._dense_backup = None
        restore_pruned_structure(model, checkpoint)

    # ------------------------------------------------------------------ internals
    def _check_budget(self, trainer: pl.Trainer) -> None:
        """An unreachable ``target_macs`` / ``target_params`` is refused here, before the dense epochs, where the
        data module says its image shape (``image_shape``); otherwise when pruning, as the engine checks it."""
        if self.spec.ratio is not None:
            return
        try:
            shape = getattr(getattr(trainer, "datamodule", None), "image_shape", None)
        except RuntimeError:  # a data module that knows its images only after its own setup
            shape = None
        if shape is None:
            return
        param = next(self._model.parameters())
        check_budget(self._model, self.spec, torch.zeros(1, *shape, device=param.device, dtype=param.dtype))

    def _search_latency(self, trainer: pl.Trainer) -> None:
        """The ratio for ``target_latency_ms``, found on rank 0 by timing pruned copies (the others wait) and
        broadcast; refuses an unreachable target before any training step."""
        outcome = search_on_rank_zero(
            trainer,
            lambda example, calibration: search_ratio(
                self._model,
                self.spec,
                example,
                self.latency,
                calibration,
                trials=self._latency_trials,
                progress=Progress("StructuredPruning"),
                tokens=_fixed_token_reduction(trainer),
            ).as_dict(),
        )
        search = self._adopt(LatencySearch.from_dict(outcome))
        rank_zero_info(
            f"StructuredPruning: target {search.target.target_ms:g} ms for {search.target.describe()}: ratio "
            f"{search.ratio:.4g} measured {search.latency_ms:.3f} ms ({len(search.trials)} trials)"
        )

    def _adopt(self, search: LatencySearch) -> LatencySearch:
        """Prune at ``search``'s ratio from now on; its trials join the cache."""
        self._latency_trials.update(search.trials)
        self.latency_search = search
        self.spec = replace(self.spec, ratio=search.ratio)
        return search

    def _prune(self, trainer: pl.Trainer, dense: torch.nn.Module, retain: bool = False) -> PruningResult:
        """Publish ``dense`` (the model as it is now), then prune the model on every rank alike."""
        if self.latency is not None and self.latency_search is None:
            self._search_latency(trainer)  # resumed from a run that had not searched yet
        self.before_shape_change.publish(dense, retain=retain)
        model = self._model
        device = trainer.strategy.root_device
        model.to(device)
        count = self.spec.calibration_batches if self.spec.data_driven else 1
        batches = take_batches(train_loader(trainer), count, device)
        example = batches[0][0][:1]
        grad_reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None

        def decide(decider: bool) -> PruningResult:
            # Every rank joins the gradient all-reduce; the others prune a throw-away copy, then replay rank 0's.
            work = model if decider else copy.deepcopy(model)
            was_training = model.training
            result = prune(
                work,
                self.spec,
                example,
                calibration=batches if self.spec.data_driven else None,
                loss_fn=self.loss_fn,
                grad_reduce=grad_reduce,
            )
            model.train(was_training)
            return result

        result = self.decide_on_rank_zero(trainer, decide, lambda structure: apply_structure(model, structure))
        self.result = result
        importance = self.spec.to_dict()["importance"]
        self.record_change(trainer, result, f"{importance} importance", importance)
        if self.latency_search is not None:
            search = self.latency_search
            self.summary.update(
                latency_target=search.target.artifact,
                latency_threads=search.target.threads,
                target_latency_ms=search.target.target_ms,
                latency_ms=search.latency_ms,
            )
        return result


def _fixed_token_reduction(trainer: pl.Trainer) -> TokenReduction | None:
    """The token reduction a ``TokenMerging`` callback of this fit will apply at a fixed ``r``: the latency search
    measures its trial copies with it, so the ratio does what the tokens leave (one with its own latency target is
    refused in its setup: one knob is searched, the other applied while measuring)."""
    for callback in trainer.callbacks:
        if isinstance(callback, TokenMerging) and callback.latency is None:
            return callback.spec
    return None
