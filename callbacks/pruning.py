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

from pqv_lightning.callbacks._utils import check_epochs_fit_max_steps, take_batches, timm_model_of, train_loader
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
    so neither ever sees a dense parameter. ``at_epoch=K`` trains K dense epochs and prunes at the end of epoch
    K (or at the next epoch start of a run resumed past it); every optimizer then holds the pruned parameters in
    place of the replaced ones (their moments restart), LR schedulers continue unchanged, and DDP is re-wrapped.
    Under DDP, gradient statistics (Taylor, Hessian) are averaged over ranks, rank 0 decides, and every rank
    replays rank 0's structure, so all ranks hold the identical network.

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
        at_epoch: 0 prunes at fit start; K > 0 prunes after K dense epochs (< ``max_epochs``; with ``max_steps``,
            the K epochs must end before the last step).
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
        if not isinstance(model_attribute, str) or not model_attribute.isidentifier():
            raise ValueError(
                f"model_attribute={model_attribute!r} is invalid; accepted: the name of the LightningModule "
                "attribute holding the timm model, e.g. 'model'."
            )
        if not callable(loss_fn):
            raise ValueError(f"loss_fn={loss_fn!r} is invalid; accepted: a callable loss(logits, labels).")
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

    @property
    def dense_model(self) -> torch.nn.Module | None:
        """The model as it was before pruning in ``setup``, kept until fit start (for resume and teachers)."""
        return self._dense_backup

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch and current_structure(self._model) is None:
            check_epochs_fit_max_steps(trainer, self.at_epoch, "at_epoch", minimum=0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed fit whose checkpoint was written after epoch at_epoch - 1 but before its end hook pruned
        # (e.g. ModelCheckpoint after validation) starts at epoch >= at_epoch with a dense model: prune now.
        if self.at_epoch and trainer.current_epoch >= self.at_epoch and current_structure(self._model) is None:
            self._prune_mid_fit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch and trainer.current_epoch + 1 == self.at_epoch and current_structure(self._model) is None:
            self._prune_mid_fit(trainer, pl_module)

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
        # The module may outlive this callback (a second Trainer, a new callback): the hook always asks the
        # callback registered last, and wraps the class's own hook only once.
        object.__setattr__(pl_module, "_pqv_restore_callback", self)
        if "on_load_checkpoint" in vars(pl_module):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
            callback = module._pqv_restore_callback
            callback._restore(module, checkpoint)
            original(checkpoint)

        object.__setattr__(pl_module, "on_load_checkpoint", types.MethodType(on_load_checkpoint, pl_module))

    def _restore(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Give the module the checkpoint's architecture (called just before its weights load)."""
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

    def _prune_mid_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = {id(p): name for name, p in pl_module.named_parameters()}
        self._prune(trainer, pl_module)
        self._retarget_training_state(trainer, pl_module, names)

    def _retarget_training_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names_before: dict[int, str]
    ) -> None:
        """After a mid-fit shape change: the optimizers hold the new parameters, DDP wraps the new model.

        Each optimizer keeps its identity, parameter groups and hyperparameters; every parameter pruning
        replaced is swapped for its successor of the same name in place and loses its optimizer state (moments
        of the old shape). The LR schedulers are untouched, so any schedule simply continues, and a resumed run
        (whose optimizers are built over the pruned parameters) restores the very same optimizer and scheduler.
        """
        params_now = dict(pl_module.named_parameters())
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for i, old in enumerate(group["params"]):
                    new = params_now.get(names_before.get(id(old), ""))
                    if new is None or new is old:
                        continue
                    optimizer.state.pop(old, None)
                    group["params"][i] = new
        held = {id(p) for optimizer in trainer.optimizers for g in optimizer.param_groups for p in g["params"]}
        stale = [names_before[i] for i in held - {id(p) for p in params_now.values()} if i in names_before]
        if stale:
            raise RuntimeError(f"StructuredPruning: optimizer parameters not found in the pruned model: {stale[:5]}")
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy._setup_model(pl_module)
            strategy._register_ddp_hooks()

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
