"""One base for callbacks that change the timm model's parameter shapes during a fit.

:class:`StructuredPruning` and :class:`SparsityGates` both replace parameters by smaller ones in the middle of a
Lightning fit. What that takes is the same for both and lives here, once:

* **Resume.** Lightning restores a checkpoint after every callback's ``setup`` and calls only the module's
  ``on_load_checkpoint`` before loading the weights, so the pruned architecture must be rebuilt from inside that
  hook: the base wraps it on the module instance, once, and the wrapper asks the shape-changing callback
  registered last (:meth:`ShapeChangingCallback.restore_before_weights_load`).
* **Optimizers** keep their identity, parameter groups and hyperparameters, so LR schedulers simply continue (and
  a resumed run restores the same optimizer and scheduler). One rule (:func:`retarget_optimizers`): a parameter
  the module still has under the same name but as a new tensor is swapped in place for it, and loses its optimizer
  state (moments of the old shape); a parameter the module no longer has (a removed gate) is dropped from its
  group; a parameter that was never the module's is left alone.
* **DDP**: rank 0 decides the new structure, every rank replays it, and the model is re-wrapped
  (:func:`pqv_lightning.callbacks._lightning_internals.rewrap_ddp`, the one place that uses Lightning's private
  strategy API).
* **The model before the change** is published (:attr:`ShapeChangingCallback.before_shape_change`): distillation
  takes it as its default teacher, the trade-off report as its dense row. They find it through this base, whichever
  shape-changing callback the fit has and whatever the callback order.
* **State**: the structure goes into every checkpoint as plain data, and a summary of the change (method, ratio,
  parameters and MACs before and after) into the callback's state, so a resumed fit still reports it.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from pqv_lightning.callbacks._lightning_internals import rewrap_ddp
from pqv_lightning.callbacks._utils import timm_model_of
from pqv_lightning.callbacks.checkpoints import warn_if_last_checkpoint_lags
from pqv_lightning.checkpoint import STRUCTURE_KEY, current_structure, restore_pruned_structure, set_structure
from pqv_lightning.pruning import PruningResult
from pqv_lightning.safe_loading import load_weights_only
from pqv_lightning.utils.checks import check_identifier

__all__ = ["ModelBeforeShapeChange", "ShapeChangingCallback", "retarget_optimizers", "summary_line"]

_OWNER = "_pqv_shape_changer"
_WRAPPED = "_pqv_restore_hook_installed"
_SUMMARY_FIELDS = ("method", "ratio", "params_before", "params_after", "macs_before", "macs_after")


class ModelBeforeShapeChange:
    """The model as it was just before its shapes changed, delivered to whoever subscribed.

    ``publish(model, retain=True)`` also keeps the model for subscribers that come later in the same setup phase
    (a change made in ``setup`` happens before the ``setup`` of callbacks listed after it); :meth:`release` drops it
    at fit start, :meth:`clear` drops the subscribers at teardown, so nothing leaks from one fit into the next.
    Listeners get the model itself: they copy what they keep.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[nn.Module], None]] = []
        self._retained: nn.Module | None = None

    def subscribe(self, listener: Callable[[nn.Module], None]) -> None:
        """Call ``listener(model)`` at the change (at once, if the model of this fit's change is retained)."""
        self._listeners.append(listener)
        if self._retained is not None:
            listener(self._retained)

    def publish(self, model: nn.Module, retain: bool = False) -> None:
        for listener in list(self._listeners):
            listener(model)
        self._retained = model if retain else None

    @property
    def retained(self) -> nn.Module | None:
        return self._retained

    def release(self) -> None:
        self._retained = None

    def clear(self) -> None:
        self._listeners.clear()
        self._retained = None


def retarget_optimizers(
    optimizers: Iterable[torch.optim.Optimizer], names_before: dict[int, str], params_now: dict[str, nn.Parameter]
) -> None:
    """After a shape change, make every optimizer hold the module's current parameters (the rule is in the
    module docstring). ``names_before`` maps ``id(parameter)`` to its name before the change."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            kept = []
            for old in group["params"]:
                name = names_before.get(id(old))
                if name is None:  # never the module's: not ours to move
                    kept.append(old)
                    continue
                new = params_now.get(name)
                if new is not old:
                    optimizer.state.pop(old, None)
                if new is not None:
                    kept.append(new)
            group["params"] = kept


def _install_restore_hook(pl_module: pl.LightningModule, callback: ShapeChangingCallback) -> None:
    """Wrap the module instance's ``on_load_checkpoint`` once; the wrapper asks the callback registered last (the
    module may outlive a callback: a second Trainer, a new callback)."""
    object.__setattr__(pl_module, _OWNER, callback)
    if vars(pl_module).get(_WRAPPED):
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        getattr(module, _OWNER).restore_before_weights_load(module, checkpoint)
        original(checkpoint)

    object.__setattr__(pl_module, "on_load_checkpoint", types.MethodType(on_load_checkpoint, pl_module))
    object.__setattr__(pl_module, _WRAPPED, True)


class ShapeChangingCallback(Callback):
    """Base of the callbacks that change the timm model's parameter shapes during a fit (see the module docstring).

    Subclasses decide when and how (:meth:`change_mid_fit`, :meth:`decide_on_rank_zero`) and may extend
    :meth:`restore_before_weights_load` and :meth:`settings`.

    Args:
        model_attribute: attribute of the LightningModule holding the timm model.
    """

    def __init__(self, model_attribute: str = "model") -> None:
        super().__init__()
        self.model_attribute = check_identifier(
            "model_attribute",
            model_attribute,
            "the name of the LightningModule attribute holding the timm model, e.g. 'model'",
        )
        self.before_shape_change = ModelBeforeShapeChange()
        #: Plain-data summary of the change (``method``, ``ratio``, parameters and MACs before and after), kept in
        #: the callback state, so a resumed fit still has it; ``None`` before the change.
        self.summary: dict[str, Any] | None = None
        self._model: nn.Module | None = None

    @property
    def structure(self) -> dict[str, Any] | None:
        """The structure of the changed model (plain data), once changed or restored."""
        return current_structure(self._model) if self._model is not None else None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        load_weights_only(trainer)
        warn_if_last_checkpoint_lags(trainer)
        _install_restore_hook(pl_module, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before_shape_change.release()  # every setup has run: nobody else can subscribe in this fit

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.before_shape_change.clear()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        structure = self.structure
        if structure is not None:
            checkpoint[STRUCTURE_KEY] = structure

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.settings(), "summary": dict(self.summary or {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        summary = state_dict.get("summary")
        if summary and self.summary is None:
            self.summary = dict(summary)

    def dense_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` in the form :attr:`before_shape_change` publishes it (a skeleton for a resumed
        teacher, whose weights are loaded into it)."""
        return copy.deepcopy(model)

    # ------------------------------------------------------------------ for subclasses
    def settings(self) -> dict[str, Any]:
        """The callback's configuration as plain data (saved with the summary in its checkpoint state)."""
        return {}

    def restore_before_weights_load(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Give the module the checkpoint's architecture; called right before a checkpoint's weights load."""
        restore_pruned_structure(getattr(pl_module, self.model_attribute), checkpoint)

    def decide_on_rank_zero(
        self,
        trainer: pl.Trainer,
        decide: Callable[[bool], PruningResult | None],
        replay: Callable[[dict[str, Any]], None],
    ) -> PruningResult | None:
        """Change the model the same way on every rank: ``decide(is_decider)`` runs on every rank (rank 0 decides;
        the others may join collectives on a throw-away copy and return ``None`` or their copy's result); rank 0's
        structure is broadcast and the other ranks ``replay`` it. The structure is then recorded on the model."""
        distributed = trainer.world_size > 1
        decider = trainer.is_global_zero or not distributed
        result = decide(decider)
        structure = result.structure if decider and result is not None else None
        if distributed:
            structure = trainer.strategy.broadcast(structure, src=0)
            if not decider:
                replay(structure)
        set_structure(self._model, structure)
        return result

    def change_mid_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, change: Callable[[], Any]) -> Any:
        """Run ``change()`` (which replaces parameters of the model), then make the optimizers hold the new
        parameters and re-wrap DDP; returns what ``change`` returned."""
        names_before = {id(p): name for name, p in pl_module.named_parameters()}
        outcome = change()
        retarget_optimizers(trainer.optimizers, names_before, dict(pl_module.named_parameters()))
        rewrap_ddp(trainer, pl_module)
        return outcome

    def record_change(self, trainer: pl.Trainer, result: PruningResult, method: str, label: str) -> None:
        """Keep the summary of ``result`` (``method`` says what chose the channels, e.g. ``"taylor importance"``)
        and, on rank 0, log it: a console line (``label`` in brackets), logger metrics, the layer widths."""
        self.summary = {
            "method": method,
            "ratio": result.ratio,
            "params_before": result.params_before,
            "params_after": result.params_after,
            "macs_before": result.macs_before,
            "macs_after": result.macs_after,
        }
        if not trainer.is_global_zero:
            return
        rank_zero_info(
            f"{type(self).__name__}: ratio {result.ratio:.4g} ({label}): "
            f"params {result.params_before / 1e6:.3f}M -> {result.params_after / 1e6:.3f}M "
            f"(-{100 * result.params_reduction:.1f}%), MACs {result.macs_before / 1e6:.2f}M -> "
            f"{result.macs_after / 1e6:.2f}M (-{100 * result.macs_reduction:.1f}%), "
            f"{len(result.layer_widths)} layers narrowed"
        )
        metrics = {f"pruning/{key}": float(self.summary[key]) for key in _SUMMARY_FIELDS[1:]}
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


def summary_line(summary: dict[str, Any]) -> str:
    """One line for reports: ``"taylor importance, ratio 0.25: params 5.4M -> 3.0M, MACs ..."``."""
    return (
        f"{summary['method']}, ratio {summary['ratio']:g}: params {summary['params_before'] / 1e6:.3f}M -> "
        f"{summary['params_after'] / 1e6:.3f}M, MACs {summary['macs_before'] / 1e6:.1f}M -> "
        f"{summary['macs_after'] / 1e6:.1f}M"
    )
