"""``SparsityGates``: VTP pruning (learnable channel gates + L1 sparsity -> threshold -> finetune) in a fit."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from pqv_lightning.callbacks._utils import check_epochs_fit_max_steps, take_batches, train_loader
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure, restore_pruned_structure
from pqv_lightning.pruning import PruningResult, apply_structure
from pqv_lightning.pruning.gates import (
    attach_gates,
    fold_gates,
    gate_l1,
    gates_of,
    has_gates,
    prune_by_gates,
    remove_gates,
)
from pqv_lightning.utils.checks import check_bool, check_int, check_number

__all__ = ["SparsityGates"]


class SparsityGates(ShapeChangingCallback):
    """Visual Transformer Pruning (Zhu et al.): learn which channels matter, then remove the rest.

    At setup a gate (initialised to 1) is put on every head dimension (shared by the heads) and every MLP
    hidden channel of each block, or, for the families pruned by named couplings, on every gateable coupling (MLP
    hidden channels, expansions, attention head or value dims; see :mod:`pqv_lightning.pruning.gates` for where
    the gates sit and which channels have none); the gates are parameters of the timm model, so the optimizer
    trains them. Their L1 norm, weighted by ``l1_lambda``, is added to the objective (as its
    gradient ``l1_lambda * sign(gate)``, right before each optimizer step, after AMP unscaling and gradient
    accumulation: the same as adding the term to the loss, without touching the module's training step).

    At the start of epoch ``prune_epoch``, the gates are folded into the layers they feed (exact) and removed,
    and the ``ratio`` of channels with the smallest gates are pruned through the pruning engine (torch-pruning's
    dependency graph with a gate-magnitude importance). Training then continues as finetuning: the optimizers
    keep their settings and LR schedules, with the pruned parameters swapped in and the gates dropped. The
    structure is saved in checkpoints as plain data (resume and ``load_from_checkpoint`` rebuild it); under DDP,
    rank 0 decides and every rank replays its structure. Use it instead of ``StructuredPruning``, not with it.

    The model just before pruning, with its gates folded in (the same function, no gates), is published to
    ``before_shape_change``: it is the default teacher of :class:`KnowledgeDistillation` (which distils from it for
    the finetuning epochs) and the dense row of the trade-off report.

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
        self.ratio = check_number("ratio", ratio, 0, 1, max_open=True, accepted="a float in [0, 1)")
        self.prune_epoch = check_int("prune_epoch", prune_epoch, 1, accepted="an int >= 1 (epochs with gates)")
        self.l1_lambda = check_number("l1_lambda", l1_lambda, 0, accepted="a finite number >= 0")
        self.global_pruning = check_bool("global_pruning", global_pruning)
        self.round_to = check_int("round_to", round_to, 1, allow_none=True, accepted="None or a positive int")
        super().__init__(model_attribute)
        self.result: PruningResult | None = None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ == "StructuredPruning"]
        if others:
            raise ValueError("SparsityGates prunes by itself: use it instead of StructuredPruning, not with it.")
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or current_structure(self._model) is not None or has_gates(self._model):
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.prune_epoch >= max_epochs:
            raise ValueError(
                f"prune_epoch={self.prune_epoch} is not before max_epochs={max_epochs}: pruning would never "
                f"happen. Accepted: 1 <= prune_epoch < {max_epochs}."
            )
        attach_gates(self._model)  # before Lightning builds the optimizers, so they train the gates

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if current_structure(self._model) is not None:
            return
        try:
            check_epochs_fit_max_steps(trainer, self.prune_epoch, "prune_epoch", minimum=1)
        except ValueError:
            fold_gates(self._model)  # leave the module as it came (the same function, no gate)
            raise

    @override
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

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if has_gates(self._model):
            pl_module.log("train/gate_l1", gate_l1(self._model).detach(), batch_size=1)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At the start of epoch prune_epoch (of a resumed run too): what the gated epochs saved is the gated model.
        if trainer.current_epoch >= self.prune_epoch and current_structure(self._model) is None:
            self.change_mid_fit(trainer, pl_module, lambda: self._prune(trainer))

    @override
    def settings(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "prune_epoch": self.prune_epoch, "l1_lambda": self.l1_lambda}

    @override
    def restore_before_weights_load(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A pruned checkpoint: drop the gates attached in setup (its weights have none), then rebuild it."""
        model = getattr(pl_module, self.model_attribute)
        if checkpoint.get(STRUCTURE_KEY) is not None:
            if has_gates(model):
                remove_gates(model)
            restore_pruned_structure(model, checkpoint)

    @override
    def dense_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy with the gates folded in: the same function as the gated model, as a plain dense network."""
        dense = copy.deepcopy(model)
        fold_gates(dense)
        return dense

    # ------------------------------------------------------------------ internals
    def _prune(self, trainer: pl.Trainer) -> PruningResult | None:
        model = self._model
        self.before_shape_change.publish(self.dense_copy(model))
        example = take_batches(train_loader(trainer), 1, trainer.strategy.root_device)[0][0][:1]
        was_training = model.training

        def decide(decider: bool) -> PruningResult | None:
            if not decider:
                return None
            return prune_by_gates(model, self.ratio, example, self.global_pruning, self.round_to)

        def replay(structure: dict[str, Any]) -> None:
            fold_gates(model)  # gates are identical on every rank (DDP): fold, then replay rank 0's choice
            apply_structure(model, structure)

        result = self.decide_on_rank_zero(trainer, decide, replay)
        model.train(was_training)
        self.result = result
        if result is not None:
            self.record_change(trainer, result, "VTP sparsity gates", f"{100 * self.ratio:.3g}% of gated channels")
        return result
