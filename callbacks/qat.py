"""``QuantizationAwareTraining``: the last epochs of a fit trained through fake quantization, converted at the end.

The engine is :mod:`pqv_lightning.quantization.qat` (torchao's PT2E QAT for INT8 with XNNPACK, torchao's
``QATConfig`` for INT4 weights); this callback decides when, swaps the fake-quantized model into the
LightningModule mid-fit the way a shape-changing callback swaps a pruned one (the optimizers keep their groups,
hyperparameters and the moments of every parameter, the schedulers continue, DDP is re-wrapped), keeps the
observers' state in every checkpoint (plain tensors in the module's state dict) and converts the result at train
end.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from pqv_lightning.callbacks._lightning_internals import rewrap_ddp
from pqv_lightning.callbacks._utils import timm_model_of
from pqv_lightning.callbacks.fit_end import FitEndRun
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback, retarget_optimizers
from pqv_lightning.callbacks.token_merging import TokenMerging
from pqv_lightning.quantization import (
    QuantizedModel,
    check_qat_target,
    convert_qat,
    float_weights,
    prepare_qat,
    quantization_state,
    resolve_float_layers,
    set_observers,
    smooth_outliers,
)
from pqv_lightning.utils.batches import images_of
from pqv_lightning.utils.checks import check_bool, check_identifier, check_int, invalid

__all__ = ["QAT_KEY", "QATResult", "QuantizationAwareTraining"]

#: Checkpoint key of the fake-quantized model's recipe (plain data), read before the weights load on resume.
QAT_KEY = "pqv_quantization_aware_training"
_HOOKED = "_pqv_qat_restore_hook"


@dataclass
class QATResult:
    """What a QAT fit ends with: the float model holding the trained weights, and the converted variant."""

    float_model: nn.Module
    variant: QuantizedModel
    info: dict[str, Any] = field(default_factory=dict)


class QuantizationAwareTraining(Callback):
    """Fake-quantizes the model from epoch ``start_epoch`` to the end of the fit, then converts it.

    At the first training batch of epoch ``start_epoch`` (after every epoch-start hook, so after any pruning or
    gate folding of that epoch, whatever the callback order) the LightningModule's timm model is replaced by a
    fake-quantized copy: for ``int8_pt2e:xnnpack`` the model rewritten for XNNPACK
    (:func:`~pqv_lightning.export.prepare_for_xnnpack`), exported and prepared with ``prepare_qat_pt2e``
    (per-channel INT8 weights, INT8 activations whose ranges the observers learn); for ``int4_weight`` torchao's
    ``QATConfig`` (4-bit weights, 8-bit per-token activations). The optimizers keep every parameter's state, DDP
    is re-wrapped (every rank prepares the same model; DDP's re-wrap and buffer broadcast keep rank 0's observer
    state everywhere), observers are frozen during validation. At train end the quantization state is broadcast
    from rank 0 and, on rank 0, the model is converted: :attr:`result` holds the float model with the trained
    weights and the quantized variant, and the fit-end chain (:class:`Quantization`, :class:`MobileExport`,
    :class:`TradeoffReport`) evaluates, exports (``.pte``, verified against this variant) and measures them; the
    LightningModule keeps the fake-quantized model.

    Resume: checkpoints hold the fake-quantized model's tensors (weights, observer ranges, scales) in the state
    dict and its recipe under ``checkpoint["pqv_quantization_aware_training"]`` (plain data); the module's
    ``on_load_checkpoint`` is wrapped so the fake-quantized model is rebuilt before the weights load.

    Args:
        target: ``"int8_pt2e:xnnpack"`` or ``"int4_weight"`` (see ``pqv_lightning.quantization.QAT_TARGETS``).
        start_epoch: the first epoch trained through fake quantization (``< max_epochs``; at or after the epoch a
            pruning or gates callback changes the model).
        float_layers: names or globs of layers or blocks trained and kept in float.
        group_size: INT4 weight group (input channels), used when every layer width is a multiple of it.
        smoothing: smooth activation outliers into the weights just before fake quantization starts
            (:func:`~pqv_lightning.quantization.smooth_outliers` on that first batch, decided on rank 0 and
            broadcast): the same float function, a better starting point for the fake-quantized ranges.
        model_attribute: attribute of the LightningModule holding the timm model.
    """

    def __init__(
        self,
        target: str = "int8_pt2e:xnnpack",
        start_epoch: int = 1,
        float_layers: list[str] | tuple[str, ...] = (),
        group_size: int = 32,
        model_attribute: str = "model",
        smoothing: bool = False,
    ) -> None:
        super().__init__()
        self.smoothing = check_bool("smoothing", smoothing)
        self.target = check_qat_target(target)
        self.start_epoch = check_int("start_epoch", start_epoch, 0)
        if isinstance(float_layers, str):
            float_layers = [float_layers]
        for i, pattern in enumerate(float_layers):
            if not isinstance(pattern, str) or not pattern.strip():
                raise invalid(f"float_layers[{i}]", pattern, "a layer or block name, or a glob of them")
        self.float_layers = tuple(float_layers)
        self.group_size = check_int("group_size", group_size, 1)
        self.model_attribute = check_identifier("model_attribute", model_attribute)
        self.result: QATResult | None = None
        self._reset()

    def _reset(self) -> None:
        self._layers: tuple[str, ...] = ()  # float_layers resolved against the model
        self._recipe: dict[str, Any] | None = None  # what rebuilds the fake-quantized model (checkpointed)
        self._template: nn.Module | None = None  # the float model just before fake quantization (CPU)

    @property
    def active(self) -> bool:
        """Whether the LightningModule trains the fake-quantized model now."""
        return self._recipe is not None

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        if stage != "fit":
            return
        self._reset()
        self.result = None
        precision = str(trainer.precision)
        if precision.endswith("-true") and precision != "32-true":
            # The fake-quantized model is float32 (it is exported and converted so); a "-true" precision hands it
            # batches in its own dtype at every step, and the first layer refuses them.
            raise invalid(
                "precision",
                precision,
                "32-true, 16-mixed or bf16-mixed: quantization-aware training trains a float32 fake-quantized model",
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.start_epoch >= max_epochs:
            raise invalid(
                "start_epoch",
                self.start_epoch,
                f"an int in [0, {max_epochs - 1}]: with max_epochs={max_epochs} no epoch would train through fake "
                "quantization",
            )
        for callback in trainer.callbacks:
            if isinstance(callback, ShapeChangingCallback):
                changes = getattr(callback, "at_epoch", getattr(callback, "prune_epoch", None))
                if isinstance(changes, int) and changes > self.start_epoch:
                    raise invalid(
                        "start_epoch",
                        self.start_epoch,
                        f"an int >= {changes}: {type(callback).__name__} changes the model at epoch {changes}, and "
                        "quantization-aware training fine-tunes the final network",
                    )
            if isinstance(callback, TokenMerging) and (
                callback.at_epoch is None or callback.at_epoch > self.start_epoch
            ):
                raise invalid(
                    "at_epoch",
                    callback.at_epoch,
                    f"an int <= {self.start_epoch} for TokenMerging: QuantizationAwareTraining exports the model at "
                    f"its start_epoch={self.start_epoch} and fine-tunes that graph, which must already reduce tokens",
                )
        self._layers = resolve_float_layers(model, self.float_layers, self.target.method)
        _install_restore_hook(pl_module, self)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.active or trainer.current_epoch < self.start_epoch:
            return
        example = images_of(batch)
        if self.smoothing:
            self._smooth(trainer, pl_module, example)
        self._start(trainer, pl_module, list(example.shape))
        set_observers(getattr(pl_module, self.model_attribute), True)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:
            set_observers(getattr(pl_module, self.model_attribute), True)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:  # evaluation must not move the learned ranges
            set_observers(getattr(pl_module, self.model_attribute), False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.state.fn == TrainerFn.FITTING:
            set_observers(getattr(pl_module, self.model_attribute), True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            rank_zero_warn(
                f"QuantizationAwareTraining: the fit ended before epoch start_epoch={self.start_epoch}; nothing was "
                "trained through fake quantization and no QAT variant is produced."
            )
            return
        prepared = getattr(pl_module, self.model_attribute)
        set_observers(prepared, False)
        if trainer.world_size > 1:  # the last step's observer update happened on each rank's own batch
            state = quantization_state(prepared)
            synced = trainer.strategy.broadcast({k: v.detach().cpu() for k, v in state.items()}, src=0)
            with torch.no_grad():
                for name, value in synced.items():
                    state[name].copy_(value.to(state[name].device))
        if not trainer.is_global_zero:
            return
        info = {
            "start_epoch": self.start_epoch,
            "epochs": trainer.current_epoch + 1 - self.start_epoch,
            "global_step": trainer.global_step,
            "float_layers": list(self._layers),
        }
        trained = float_weights(prepared, self._template)
        variant = convert_qat(prepared, self.target, self._layers, info={"qat": info}, source=trained)
        self.result = QATResult(trained, variant, info)
        run = FitEndRun.existing(trainer)
        if run is not None:
            run.publish_trained(self.result.float_model, [variant], self.describe())
        rank_zero_info(f"QuantizationAwareTraining: converted {variant.name} ({self.describe()})")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._recipe is not None:
            checkpoint[QAT_KEY] = dict(self._recipe)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "start_epoch": self.start_epoch,
            "float_layers": list(self.float_layers),
            "group_size": self.group_size,
            "smoothing": self.smoothing,
            "active": self.active,
        }

    def describe(self) -> str:
        layers = f", {len(self._layers)} layer(s) in float" if self._layers else ", every layer quantized"
        return f"{self.target} from epoch {self.start_epoch}{layers}"

    # ------------------------------------------------------------------ internals
    def restore_before_weights_load(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Rebuild the fake-quantized model a checkpoint holds (called right before its weights load)."""
        recipe = checkpoint.get(QAT_KEY)
        if recipe is None or self.active:
            return
        if recipe.get("target") != str(self.target):
            raise invalid(
                "target",
                str(self.target),
                f"{recipe.get('target')!r}, the target the checkpoint was "
                "trained through fake quantization for (resume with the settings of the original run)",
            )
        if tuple(recipe.get("float_layers", ())) != self._layers:
            raise invalid(
                "float_layers",
                list(self._layers),
                f"{recipe.get('float_layers')!r}, the float layers "
                "the checkpoint was trained with (resume with the settings of the original run)",
            )
        self._prepare(pl_module, recipe["example_shape"], int(recipe.get("group_size", self.group_size)))

    def _smooth(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: torch.Tensor) -> None:
        """Smooth the training model in place (the same function), decided on rank 0 and the same on every rank."""
        model = getattr(pl_module, self.model_attribute)
        state = None
        if trainer.is_global_zero:
            result = smooth_outliers(model, [images])
            state = {k: v for k, v in result.model.state_dict().items()}
            rank_zero_info(f"QuantizationAwareTraining: smoothing: {result.summary()}")
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast(state, src=0)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(state[name].to(tensor.device, tensor.dtype))

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example_shape: list[int]) -> None:
        names_before = {id(p): name for name, p in pl_module.named_parameters()}
        before = dict(pl_module.named_parameters())
        with torch.random.fork_rng(devices=[]):  # a resumed run rebuilds without drawing: keep the streams alike
            self._prepare(pl_module, example_shape, self.group_size)
        now = dict(pl_module.named_parameters())
        for optimizer in trainer.optimizers:  # the moments go with the values (the patch weight is stored 2-D)
            for name, old in before.items():
                new = now.get(name)
                if new is not None and new is not old and old in optimizer.state:
                    optimizer.state[new] = {
                        k: v.reshape(new.shape) if torch.is_tensor(v) and v.shape == old.shape else v
                        for k, v in optimizer.state[old].items()
                    }
        retarget_optimizers(trainer.optimizers, names_before, now)
        rewrap_ddp(trainer, pl_module)
        rank_zero_info(f"QuantizationAwareTraining: training through fake quantization: {self.describe()}")

    def _prepare(self, pl_module: pl.LightningModule, example_shape: list[int], group_size: int) -> None:
        model = getattr(pl_module, self.model_attribute)
        device = next(model.parameters()).device
        self._template = copy.deepcopy(model).cpu()
        # The graph is built from the CPU copy, on the CPU where it is converted at train end, and then moved to the
        # training device: the same graph whatever the accelerator.
        example = torch.zeros(example_shape)
        from pqv_lightning.export import prepare_for_xnnpack  # imports ExecuTorch (~8 s): only when QAT starts

        prepared = prepare_qat(prepare_for_xnnpack(self._template), self.target, example, self._layers, group_size)
        setattr(pl_module, self.model_attribute, prepared.to(device))
        self._recipe = {
            "target": str(self.target),
            "float_layers": list(self._layers),
            "group_size": group_size,
            "example_shape": list(example_shape),
            "start_epoch": self.start_epoch,
        }


def _install_restore_hook(pl_module: pl.LightningModule, callback: QuantizationAwareTraining) -> None:
    """Wrap the module instance's ``on_load_checkpoint`` once: the module's own hook (and a pruning callback's
    structure restore) first, then the fake-quantized model of the checkpoint, rebuilt by the callback registered
    last."""
    already = vars(pl_module).get(_HOOKED) is not None
    object.__setattr__(pl_module, _HOOKED, callback)
    if already:
        return
    restore_first = pl_module.on_load_checkpoint

    def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        restore_first(checkpoint)
        vars(module)[_HOOKED].restore_before_weights_load(module, checkpoint)

    object.__setattr__(pl_module, "on_load_checkpoint", types.MethodType(on_load_checkpoint, pl_module))
