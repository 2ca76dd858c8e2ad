"""``StructuredPruning``: dependency-graph pruning of a timm ViT inside a Lightning fit."""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from pqv_lightning.callbacks._utils import take_batches, timm_model_of, train_loader
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure, restore_pruned_structure, set_structure
from pqv_lightning.pruning import PruningResult, PruningSpec, apply_structure, check_supported, prune

__all__ = ["StructuredPruning"]


class StructuredPruning(Callback):
    """Structured pruning with torch-pruning's dependency graph, at fit start or after ``at_epoch`` epochs.

    ``ratio`` has one meaning: torch-pruning's ``pruning_ratio``, the fraction of channels removed in each
    prunable group (uniform pruning: in every group; ``global_pruning``: on average, ranked across groups). The
    defaults (uniform L2, head dimensions pruned with heads kept, embedding width pruned, classifier kept) give
    the network torch-pruning's own ViT pruning gives for the same ratio and criterion.

    When: ``at_epoch=0`` (default) prunes in ``setup``, before Lightning creates the optimizers and wraps DDP,
    so neither ever sees a dense parameter. ``at_epoch=K`` trains K dense epochs, prunes at the end of epoch K,
    then rebuilds the optimizers and LR schedulers (the default schedule continues where it was) and re-wraps
    DDP. Under DDP, gradient statistics (Taylor, Hessian) are averaged over ranks, rank 0 decides, and every
    rank replays rank 0's structure, so all ranks hold the identical network.

    The structure is saved in every checkpoint as plain data. Resuming (``trainer.fit(ckpt_path=...)``) or
    ``ViTClassifier.load_from_checkpoint`` rebuilds it before the weights load, without recomputing importance.
    Works on any LightningModule that exposes its timm model as ``model`` (or ``model_attribute``).

    Args:
        ratio: fraction of channels removed per prunable group, in [0, 1). ``None`` with a budget.
        importance: ``"l1"``, ``"l2"`` (Frobenius norm of each channel's weights), ``"taylor"``, ``"hessian"``,
            ``"random"``, or a ``torch_pruning.importance.Importance`` object.
        global_pruning: rank channels across all groups instead of pruning each group by ``ratio``.
        bottleneck: prune only inside attention and MLP blocks, keeping the embedding width.
        prune_heads: remove whole attention heads instead of head dimensions.
        ignored_layers: module names (of the timm model) to leave alone; the classifier always is.
        round_to: round kept channel counts to a multiple (hardware-friendly widths).
        target_macs: prune until the model has at most this many MACs (the ratio is searched).
        target_params: prune until the model has at most this many parameters.
        calibration_batches: training batches whose gradients score channels for Taylor / Hessian.
        at_epoch: 0 prunes at fit start; K > 0 prunes after K dense epochs.
        model_attribute: attribute of the LightningModule holding the timm model.
        loss_fn: loss of ``(logits, labels)`` for Taylor / Hessian.
    """

    def __init__(
        self,
        ratio: float | None = 0.25,
        importance: str | tp.importance.Importance = "l2",
        global_pruning: bool = False,
        bottleneck: bool = False,
        prune_heads: bool = False,
        ignored_layers: list[str] | None = None,
        round_to: int | None = None,
        target_macs: float | None = None,
        target_params: float | None = None,
        calibration_batches: int = 10,
        at_epoch: int = 0,
        model_attribute: str = "model",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        self.spec = PruningSpec(
            ratio=ratio,
            importance=importance,
            global_pruning=global_pruning,
            bottleneck=bottleneck,
            prune_heads=prune_heads,
            ignored_layers=tuple(ignored_layers or ()),
            round_to=round_to,
            target_macs=target_macs,
            target_params=target_params,
            calibration_batches=calibration_batches,
        )
        if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 0:
            raise ValueError(f"at_epoch={at_epoch!r} is invalid; accepted: 0 (fit start) or a positive epoch count.")
        self.at_epoch = at_epoch
        self.model_attribute = model_attribute
        self.loss_fn = loss_fn
        self.result: PruningResult | None = None
        self._dense_backup: torch.nn.Module | None = None
        self._dense_listeners: list[Callable[[torch.nn.Module], None]] = []

    @property
    def structure(self) -> dict[str, Any] | None:
        """The structure of the pruned model (plain data), once pruned or restored."""
        return current_structure(self._model) if hasattr(self, "_model") else None

    def on_dense_model(self, listener: Callable[[torch.nn.Module], None]) -> None:
        """Call ``listener(dense_model)`` with the model just before it is pruned (e.g. to keep a teacher)."""
        self._dense_listeners.append(listener)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        check_supported(self._model, self.spec)
        self._restore_before_weights_load(pl_module)
        if stage != "fit" or current_structure(self._model) is not None:
            return
        max_epochs = trainer.max_epochs
        if self.at_epoch and max_epochs is not None and max_epochs >= 0 and self.at_epoch >= max_epochs:
            raise ValueError(
                f"at_epoch={self.at_epoch} is not before max_epochs={max_epochs}: pruning would never happen. "
                f"Accepted: 0 <= at_epoch < {max_epochs}."
            )
        if self.at_epoch == 0:
            # A resumed fit restores its pruned structure after setup: keep the dense model until then.
            self._dense_backup = copy.deepcopy(self._model)
            self._prune(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dense_backup = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch and trainer.current_epoch + 1 == self.at_epoch and current_structure(self._model) is None:
            self._prune(trainer, pl_module)
            self._rebuild_training_state(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        structure = current_structure(self._model)
        if structure is not None:
            checkpoint[STRUCTURE_KEY] = structure

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "at_epoch": self.at_epoch, "summary": self._summary()}

    # ------------------------------------------------------------------ internals
    def _restore_before_weights_load(self, pl_module: pl.LightningModule) -> None:
        """Make the module rebuild a checkpoint's pruned structure before its weights load.

        Lightning restores a checkpoint after ``setup`` and before the optimizers exist, calling only the
        module's ``on_load_checkpoint`` in between; this wraps that hook of this module instance.
        """
        if getattr(pl_module, "_pqv_restore_wrapped", False):
            return
        original = pl_module.on_load_checkpoint
        callback = self

        def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
            stored = checkpoint.get(STRUCTURE_KEY)
            model = getattr(module, callback.model_attribute)
            if stored is not None and current_structure(model) not in (None, stored):
                if callback._dense_backup is None:
                    raise ValueError("The checkpoint's pruned structure differs from the model's pruned structure.")
                # Pruned in setup, then asked to resume another structure: start again from the dense model.
                model = callback._dense_backup
                callback._dense_backup = None
                setattr(module, callback.model_attribute, model)
                callback._model = model
            restore_pruned_structure(model, checkpoint)
            original(checkpoint)

        pl_module.on_load_checkpoint = types.MethodType(on_load_checkpoint, pl_module)
        pl_module._pqv_restore_wrapped = True

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model
        for listener in self._dense_listeners:
            listener(model)
        device = trainer.strategy.root_device
        model.to(device)
        count = self.spec.calibration_batches if self.spec.data_driven else 1
        batches = take_batches(train_loader(trainer), count, device)
        example = batches[0][0][:1]
        distributed = trainer.world_size > 1
        grad_reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if distributed else None
        # Every rank joins the gradient all-reduce; rank 0 decides and the others replay its structure.
        work = model if trainer.is_global_zero or not distributed else copy.deepcopy(model)
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
        structure = trainer.strategy.broadcast(result.structure, src=0) if distributed else result.structure
        if work is not model:
            apply_structure(model, structure)
        set_structure(model, structure)
        self.result = result
        self._report(trainer, result)

    def _rebuild_training_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a mid-fit shape change: fresh DDP wrapper, optimizers and schedulers over the new parameters."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy._setup_model(pl_module)
            strategy._register_ddp_hooks()
        strategy.setup_optimizers(trainer)
        strategy.setup_precision_plugin()

    def _summary(self) -> dict[str, Any]:
        result = self.result
        if result is None:
            return {}
        return {
            "ratio": result.ratio,
            "params_before": result.params_before,
            "params_after": result.params_after,
            "macs_before": result.macs_before,
            "macs_after": result.macs_after,
        }

    def _report(self, trainer: pl.Trainer, result: PruningResult) -> None:
        if not trainer.is_global_zero:
            return
        rank_zero_info(
            f"StructuredPruning: ratio {result.ratio:.4g} ({self.spec.to_dict()['importance']}): "
            f"params {result.params_before / 1e6:.3f}M -> {result.params_after / 1e6:.3f}M "
            f"(-{100 * result.params_reduction:.1f}%), MACs {result.macs_before / 1e6:.2f}M -> "
            f"{result.macs_after / 1e6:.2f}M (-{100 * result.macs_reduction:.1f}%), "
            f"{len(result.layer_widths)} layers narrowed"
        )
        metrics = {f"pruning/{key}": float(value) for key, value in self._summary().items()}
        metrics["pruning/params_reduction"] = result.params_reduction
        metrics["pruning/macs_reduction"] = result.macs_reduction
        rows = "\n".join(
            f"| {name} | {before} | {after} |" for name, (before, after) in sorted(result.layer_widths.items())
        )
        table = f"| layer | width before | width after |\n|---|---|---|\n{rows}"
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("pruning/layer_widths", table, global_step=trainer.global_step)
