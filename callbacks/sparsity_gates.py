"""``SparsityGates``: VTP pruning (learnable channel gates + L1 sparsity -> threshold -> finetune) in a fit."""

from __future__ import annotations

import math
import types
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from pqv_lightning.callbacks._utils import check_epochs_fit_max_steps, take_batches, timm_model_of, train_loader
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure, restore_pruned_structure, set_structure
from pqv_lightning.gates import attach_gates, fold_gates, gate_l1, gates_of, has_gates, prune_by_gates, remove_gates
from pqv_lightning.pruning import PruningResult, apply_structure

__all__ = ["SparsityGates"]


class SparsityGates(Callback):
    """Visual Transformer Pruning (Zhu et al.): learn which channels matter, then remove the rest.

    At setup a gate (initialised to 1) is put on every head dimension (shared by the heads) and every MLP
    hidden channel of each block (see :mod:`pqv_lightning.gates`); the gates are parameters of the timm model,
    so the optimizer trains them. Their L1 norm, weighted by ``l1_lambda``, is added to the objective (as its
    gradient ``l1_lambda * sign(gate)``, right before each optimizer step, after AMP unscaling and gradient
    accumulation: the same as adding the term to the loss, without touching the module's training step).

    After ``prune_epoch`` epochs, the gates are folded into the layers they feed (exact) and removed, and the
    ``ratio`` of channels with the smallest gates are pruned through the pruning engine (torch-pruning's
    dependency graph with a gate-magnitude importance). Training then continues as finetuning: the optimizers
    keep their settings and LR schedules, with the pruned parameters swapped in and the gates dropped. The
    structure is saved in checkpoints as plain data (resume and ``load_from_checkpoint`` rebuild it); under DDP,
    rank 0 decides and every rank replays its structure. Use it instead of ``StructuredPruning``, not with it.

    Args:
        ratio: fraction of head dimensions and of MLP hidden channels removed per block, in [0, 1) (with
            ``global_pruning``: overall, one threshold over all gates, as in the paper). The embedding is kept.
        prune_epoch: epochs trained with gates before pruning (>= 1, < ``max_epochs``; with ``max_steps``, its
            epochs must end before the last step).
        l1_lambda: weight of the L1 sparsity term (finite, >= 0; the paper's 1e-4).
        global_pruning: one gate threshold across all layers instead of ``ratio`` in every layer.
        round_to: round kept channel counts to a multiple.
        model_attribute: attribute of the LightningModule holding the timm model.
    """

    def __init__(
        self,
        ratio: float = 0.25,
        prune_epoch: int = 1,
        l1_lambda: float = 1e-4,
        global_pruning: bool = False,
        round_to: int | None = None,
        model_attribute: str = "model",
    ) -> None:
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio={ratio!r} is invalid; accepted: a float in [0, 1).")
        if isinstance(prune_epoch, bool) or not isinstance(prune_epoch, int) or prune_epoch < 1:
            raise ValueError(f"prune_epoch={prune_epoch!r} is invalid; accepted: an int >= 1 (epochs with gates).")
        if isinstance(l1_lambda, bool) or not isinstance(l1_lambda, (int, float)) or not 0 <= l1_lambda < math.inf:
            raise ValueError(f"l1_lambda={l1_lambda!r} is invalid; accepted: a finite number >= 0.")
        if not isinstance(global_pruning, bool):
            raise ValueError(f"global_pruning={global_pruning!r} is invalid; accepted: True or False.")
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to={round_to!r} is invalid; accepted: None or a positive int.")
        if not isinstance(model_attribute, str) or not model_attribute.isidentifier():
            raise ValueError(f"model_attribute={model_attribute!r} is invalid; accepted: an attribute name.")
        self.ratio, self.prune_epoch, self.l1_lambda = float(ratio), prune_epoch, float(l1_lambda)
        self.global_pruning, self.round_to, self.model_attribute = global_pruning, round_to, model_attribute
        self.result: PruningResult | None = None

    @property
    def structure(self) -> dict[str, Any] | None:
        return current_structure(self._model) if hasattr(self, "_model") else None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ == "StructuredPruning"]
        if others:
            raise ValueError("SparsityGates prunes by itself: use it instead of StructuredPruning, not with it.")
        self._model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        self._install_restore_hook(pl_module)
        if stage != "fit" or current_structure(self._model) is not None or has_gates(self._model):
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.prune_epoch >= max_epochs:
            raise ValueError(
                f"prune_epoch={self.prune_epoch} is not before max_epochs={max_epochs}: pruning would never "
                f"happen. Accepted: 1 <= prune_epoch < {max_epochs}."
            )
        attach_gates(self._model)  # before Lightning builds the optimizers, so they train the gates

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if current_structure(self._model) is not None:
            return
        try:
            check_epochs_fit_max_steps(trainer, self.prune_epoch, "prune_epoch", minimum=1)
        except ValueError:
            fold_gates(self._model)  # leave the module as it came (the same function, no gate)
            raise

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        gates = list(gates_of(self._model).values())
        if not gates or self.l1_lambda == 0:
            return
        with torch.no_grad():
            for gate in gates:
                step = self.l1_lambda * gate.sign()
                gate.grad = step if gate.grad is None else gate.grad.add_(step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if has_gates(self._model):
            pl_module.log("train/gate_l1", gate_l1(self._model).detach(), batch_size=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed from a checkpoint written after epoch prune_epoch - 1 but before pruning.
        if trainer.current_epoch >= self.prune_epoch and current_structure(self._model) is None:
            self._prune_mid_fit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.prune_epoch and current_structure(self._model) is None:
            self._prune_mid_fit(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        structure = current_structure(self._model)
        if structure is not None:
            checkpoint[STRUCTURE_KEY] = structure

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "prune_epoch": self.prune_epoch, "l1_lambda": self.l1_lambda}

    # ------------------------------------------------------------------ internals
    def _install_restore_hook(self, pl_module: pl.LightningModule) -> None:
        """Before a pruned checkpoint's weights load: drop the gates and rebuild its structure.

        Lightning restores checkpoints after ``setup`` (where the gates were attached), calling only the module's
        ``on_load_checkpoint`` before the weights load; this wraps that hook of this module instance once.
        """
        object.__setattr__(pl_module, "_pqv_gates_callback", self)
        if "_pqv_gates_restore" in vars(pl_module):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
            callback = module._pqv_gates_callback
            model = getattr(module, callback.model_attribute)
            if checkpoint.get(STRUCTURE_KEY) is not None and has_gates(model):
                remove_gates(model)
                restore_pruned_structure(model, checkpoint)
            original(checkpoint)

        object.__setattr__(pl_module, "on_load_checkpoint", types.MethodType(on_load_checkpoint, pl_module))
        object.__setattr__(pl_module, "_pqv_gates_restore", True)

    def _prune_mid_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names_before = {id(p): name for name, p in pl_module.named_parameters()}
        model = self._model
        device = trainer.strategy.root_device
        example = take_batches(train_loader(trainer), 1, device)[0][0][:1]
        distributed = trainer.world_size > 1
        was_training = model.training
        if trainer.is_global_zero or not distributed:
            result = prune_by_gates(model, self.ratio, example, self.global_pruning, self.round_to)
            structure = result.structure
        else:
            result = None
            structure = None
        if distributed:
            structure = trainer.strategy.broadcast(structure, src=0)
            if result is None:  # gates are identical on every rank (DDP): fold, then replay rank 0's choice
                fold_gates(model)
                apply_structure(model, structure)
        model.train(was_training)
        set_structure(model, structure)
        self.result = result
        _retarget_optimizers(trainer, pl_module, names_before)
        if isinstance(trainer.strategy, DDPStrategy):
            trainer.strategy.model = trainer.strategy._setup_model(pl_module)
            trainer.strategy._register_ddp_hooks()
        if result is not None and trainer.is_global_zero:
            rank_zero_info(
                f"SparsityGates: pruned {100 * self.ratio:.3g}% of gated channels: params "
                f"{result.params_before / 1e6:.3f}M -> {result.params_after / 1e6:.3f}M, MACs "
                f"{result.macs_before / 1e6:.2f}M -> {result.macs_after / 1e6:.2f}M"
            )
            for logger in trainer.loggers:
                logger.log_metrics(
                    {
                        "pruning/params_reduction": result.params_reduction,
                        "pruning/macs_reduction": result.macs_reduction,
                    },
                    step=trainer.global_step,
                )


def _retarget_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule, names_before: dict[int, str]) -> None:
    """Swap each replaced parameter for its pruned successor (same name) and drop removed ones (the gates).

    Optimizers keep their identity, groups and hyperparameters, so LR schedulers continue; replaced and removed
    parameters lose their optimizer state (moments of the old shape).
    """
    params_now = dict(pl_module.named_parameters())
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            kept = []
            for old in group["params"]:
                new = params_now.get(names_before.get(id(old), ""))
                if new is not old:
                    optimizer.state.pop(old, None)
                if new is not None:
                    kept.append(new)
            group["params"] = kept
    live = {id(p) for p in params_now.values()}
    stale = [
        names_before.get(id(p), "?")
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) not in live
    ]
    if stale:
        raise RuntimeError(f"SparsityGates: optimizer parameters not found in the pruned model: {stale[:5]}")
