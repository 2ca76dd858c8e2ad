"""One base for the fit-end callbacks: each holds only its config; the chain runs once, in a fixed order.

:class:`Quantization`, :class:`MobileExport` and :class:`TradeoffReport` are three views of one job,
:func:`pqv_lightning.pipeline.run_pipeline` (quantize -> export -> measure and report). The first of them whose
``on_fit_end`` runs starts that job, on global rank 0, with the configs of all of them (the other ranks wait at one
barrier); each then logs its own part of the result. None of them calls another or reads its state: they meet in
the :class:`FitEndRun` of their trainer, created at ``setup`` and dropped at ``teardown``.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from pqv_lightning.callbacks._utils import (
    check_validation_data,
    data_loader,
    resolve_output_dir,
    timm_model_of,
    train_loader,
)
from pqv_lightning.callbacks.checkpoints import warn_if_last_checkpoint_lags
from pqv_lightning.callbacks.distillation import KnowledgeDistillation
from pqv_lightning.callbacks.shape_change import ShapeChangingCallback, summary_line
from pqv_lightning.callbacks.token_merging import TokenMerging
from pqv_lightning.checkpoint import STRUCTURE_KEY, TOKENS_KEY, current_structure, read_checkpoint
from pqv_lightning.pipeline import ExportConfig, PipelineResult, QuantizationConfig, ReportConfig, run_pipeline
from pqv_lightning.quantization import QuantizedModel
from pqv_lightning.safe_loading import load_weights_only
from pqv_lightning.tokens import token_reduction_of
from pqv_lightning.utils.checks import check_choice, check_identifier
from pqv_lightning.utils.modules import cpu_float_copy
from pqv_lightning.utils.progress import Progress

__all__ = ["ON_FAILURE", "WEIGHTS", "FitEndCallback", "FitEndIncompleteError", "FitEndRun"]

#: What a fit-end callback does when its stage produced nothing: raise at fit end (after everything is saved), or
#: only warn.
ON_FAILURE = ("raise", "warn")
#: Which weights the chain ships: the best monitored checkpoint of the final network, or those at fit end.
WEIGHTS = ("best", "last")


class FitEndRun:
    """The fit-end chain of one fit: the stages' configs (output folders resolved), the dense model the report
    compares with, and, once run, the :class:`~pqv_lightning.pipeline.PipelineResult`."""

    _by_trainer: ClassVar[weakref.WeakKeyDictionary[pl.Trainer, FitEndRun]] = weakref.WeakKeyDictionary()

    def __init__(self, trainer: pl.Trainer, stages: list[FitEndCallback]) -> None:
        kinds = [type(stage).__name__ for stage in stages]
        twice = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if twice:
            raise ValueError(
                f"{', '.join(twice)} is listed more than once in Trainer(callbacks=...); accepted: one of each "
                "(give all quantization targets or export formats to one callback)."
            )
        attributes = sorted({stage.model_attribute for stage in stages})
        if len(attributes) > 1:
            raise ValueError(
                f"The fit-end callbacks name different model attributes {attributes}; accepted: one attribute "
                f"(model_attribute={attributes[0]!r} on each of {', '.join(kinds)})."
            )
        self.model_attribute = attributes[0]
        chosen = sorted({stage.weights for stage in stages if stage.weights is not None})
        if len(chosen) > 1:
            raise ValueError(
                f"The fit-end callbacks ask for different weights {chosen}; accepted: one choice, 'best' or 'last' "
                "(set it on one of them; the others follow)."
            )
        self.weights = chosen[0] if chosen else "best"
        self.policies = {stage.stage: stage.on_failure for stage in stages}
        configs: dict[str, Any] = {stage.stage: stage.config for stage in stages}
        for name, default in (("export", "artifacts"), ("report", "report")):
            if name in configs:  # every rank resolves (trainer.log_dir is collective) and checks it is writable
                folder = resolve_output_dir(trainer, configs[name].output_dir, default)
                configs[name] = replace(configs[name], output_dir=folder)
        self.configs = configs
        self.dense_model: nn.Module | None = None
        #: published by a QuantizationAwareTraining callback at train end: (float model, QAT variants, what)
        self.trained: tuple[nn.Module, list[QuantizedModel], str] | None = None
        self.result: PipelineResult | None = None
        #: stage -> why it produced nothing (the same on every rank once the chain ran)
        self.shortfalls: dict[str, str] = {}
        self.done = False
        self._logged: set[str] = set()
        report = configs.get("report")
        changers = [cb for cb in trainer.callbacks if isinstance(cb, ShapeChangingCallback)]
        if report is not None and report.include_dense and changers and trainer.is_global_zero:
            changers[0].before_shape_change.subscribe(self._keep_dense)

    @classmethod
    def join(cls, trainer: pl.Trainer) -> FitEndRun:
        """The run of ``trainer``'s fit, created by the first fit-end callback that asks (in ``setup``)."""
        run = cls._by_trainer.get(trainer)
        if run is None:
            stages = [cb for cb in trainer.callbacks if isinstance(cb, FitEndCallback)]
            run = cls._by_trainer[trainer] = cls(trainer, stages)
        return run

    @classmethod
    def leave(cls, trainer: pl.Trainer) -> None:
        cls._by_trainer.pop(trainer, None)

    @classmethod
    def existing(cls, trainer: pl.Trainer) -> FitEndRun | None:
        """The run of ``trainer``'s fit if a fit-end callback created one, else ``None`` (creates nothing)."""
        return cls._by_trainer.get(trainer)

    def publish_trained(self, float_model: nn.Module, variants: list[QuantizedModel], description: str) -> None:
        """Hand the chain the result of quantization-aware training (before fit end): the chain then ships the float
        model with the QAT-trained weights and evaluates, exports and measures the converted ``variants`` too."""
        self.trained = (float_model, list(variants), description)

    def _keep_dense(self, dense: nn.Module) -> None:
        self.dense_model = cpu_float_copy(dense).requires_grad_(False)

    def execute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PipelineResult | None:
        """Run the chain once per fit (later calls return the same result) on global rank 0; every rank waits,
        then learns which stages fell short."""
        if self.done:
            return self.result
        shortfalls: dict[str, str] = {}
        try:
            if trainer.is_global_zero:
                model = timm_model_of(pl_module, self.model_attribute, "The fit-end callbacks")
                trained: list[QuantizedModel] = []
                context = _report_context(trainer)
                if self.trained is not None:  # the module holds the fake-quantized model: ship what it trained
                    model, trained, context["quantization_aware_training"] = self.trained
                    shipped, weights = model, {"weights": "last", "why": "weights trained through fake quantization"}
                else:
                    shipped, weights = self._weights_to_ship(trainer, model)
                self.result = run_pipeline(
                    shipped,
                    data_loader(trainer, "val"),
                    train_loader(trainer),
                    quantization=self.configs.get("quantization"),
                    export=self.configs.get("export"),
                    report=self.configs.get("report"),
                    dense_model=self.dense_model,
                    manifest_meta={
                        "model": type(model).__name__,
                        "lightning_module": type(pl_module).__name__,
                        "global_step": trainer.global_step,
                        "epoch": trainer.current_epoch,
                        "weights": weights,
                    },
                    report_context={**context, "weights": _weights_line(weights)},
                    trained=trained,
                    # a bar per stage where Lightning shows its own progress bar in a terminal, else a line per step
                    progress=Progress("fit end", bar=None if trainer.progress_bar_callback is not None else False),
                )
                shortfalls = self.result.shortfalls(list(self.configs))
        finally:
            self.done = True
            trainer.strategy.barrier("pqv_fit_end")
            self.shortfalls = trainer.strategy.broadcast(shortfalls, src=0)
        return self.result

    def _weights_to_ship(self, trainer: pl.Trainer, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """The model the chain quantizes, exports and measures, and a record of which weights those are.

        ``"best"``: the best-scoring checkpoint of a ``ModelCheckpoint`` that monitors a metric, among those with
        the model's final structure (a checkpoint from before pruning is another network), read weights-only;
        else the weights at fit end, and why.
        """
        if self.weights == "last":
            return model, {"weights": "last", "why": "weights='last' was asked for"}
        monitored = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
        if not monitored:
            return model, {"weights": "last", "why": "no ModelCheckpoint monitors a metric"}
        structure, prefix = current_structure(model), f"{self.model_attribute}."
        tokens = _trained_token_reduction(trainer, model)
        for callback in monitored:
            ranked = sorted(callback.best_k_models.items(), key=lambda kv: float(kv[1]), reverse=callback.mode == "max")
            for path, score in ranked:
                if not Path(path).is_file():
                    continue
                checkpoint = read_checkpoint(path)
                if checkpoint.get(STRUCTURE_KEY) != structure or checkpoint.get(TOKENS_KEY) != tokens:
                    continue
                best = copy.deepcopy(model)
                best.load_state_dict(
                    {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
                )
                return best, {
                    "weights": "best",
                    "checkpoint": str(path),
                    "monitor": callback.monitor,
                    "score": float(score),
                    "epoch": checkpoint.get("epoch"),
                }
        return model, {
            "weights": "last",
            "why": "no monitored checkpoint holds the final network (its structure and token reduction)",
        }

    def stage_logged(self, stage: str) -> bool:
        """Note that ``stage`` has logged its part; True once every stage of the chain has."""
        self._logged.add(stage)
        return self._logged >= set(self.configs)


def _trained_token_reduction(trainer: pl.Trainer, model: nn.Module) -> dict[str, Any] | None:
    """The token reduction the final network was trained with, as checkpoints record it: the model's own, unless a
    ``TokenMerging`` callback applied it only at train end (off the shelf: no checkpoint of the fit holds it)."""
    reduction = token_reduction_of(model)
    if reduction is None:
        return None
    for callback in trainer.callbacks:
        summary = getattr(callback, "summary", None)
        if isinstance(callback, TokenMerging) and summary and summary.get("applied_at") == "train_end":
            return None
    return reduction.as_dict()


def _weights_line(weights: dict[str, Any]) -> str:
    if weights["weights"] == "best":
        return (
            f"best checkpoint ({weights['monitor']}={weights['score']:.4g}, epoch {weights['epoch']}): "
            f"{weights['checkpoint']}"
        )
    return f"weights at fit end ({weights['why']})"


def _report_context(trainer: pl.Trainer) -> dict[str, Any]:
    """The report's title and notes: epoch, step, what pruned the model and what it was distilled from."""
    context: dict[str, Any] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
    for callback in trainer.callbacks:
        if isinstance(callback, ShapeChangingCallback) and callback.summary:
            context["pruning"] = summary_line(callback.summary)
        if isinstance(callback, TokenMerging) and callback.summary:
            applied = callback.summary["applied_at"]
            context["tokens"] = (
                f"{callback.spec.describe()}, {'off the shelf (at train end)' if applied == 'train_end' else ''}"
                f"{'' if applied == 'train_end' else f'trained with it from epoch {applied}'}: tokens per block "
                f"{' -> '.join(map(str, callback.summary['tokens_per_block']))}"
            )
        if isinstance(callback, KnowledgeDistillation):
            context["distillation"] = (
                f"{callback.mode} (T={callback.temperature:g}, alpha={callback.alpha:g}) from "
                f"{callback.teacher_source or 'the dense model'}"
            )
    return context


class FitEndIncompleteError(RuntimeError):
    """A fit-end stage produced nothing of what it promised (no variant, no verified file, or no report); raised
    after every stage ran and logged, when checkpoints and whatever was produced are saved."""


def _shortfall_line(trainer: pl.Trainer, shortfalls: dict[str, str]) -> str:
    kept = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback is not None else None
    where = f"; the checkpoints in {kept} are untouched" if kept else ""
    stages = "; ".join(f"{stage}: {why}" for stage, why in shortfalls.items())
    return f"pqv-lightning: the fit trained, but its fit-end chain fell short ({stages}){where}."[:2000]


#: The arguments every fit-end callback takes besides its config's fields.
_SHARED_ARGS = """
        model_attribute: attribute of the LightningModule holding the timm model.
        on_failure: ``"raise"`` (default): when the stage produced nothing (no variant, no verified file, no
            report), say so in one line and raise :class:`~pqv_lightning.callbacks.fit_end.FitEndIncompleteError`
            at fit end, after every stage ran and everything was saved (the CLI exits 1); ``"warn"``: only warn.
        weights: which weights the fit-end chain ships: ``"best"`` (the best checkpoint of a ``ModelCheckpoint``
            that monitors a metric, among those of the final network; else the weights at fit end) or ``"last"``;
            ``None`` (default) follows the other fit-end callbacks, ``"best"`` if none says. The manifest and the
            report say which.
"""


def _with_args(doc: str, config: type) -> str:
    """``doc`` with an ``Args:`` section (before its ``Raises:``, if any): ``config``'s fields (documented once, in
    the config) and the shared arguments, so the callback's help (LightningCLI reads the docstring) lists them all."""
    lines = (config.__doc__ or "").partition("    Args:\n")[2].splitlines()
    end = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("        ")), len(lines))
    fields = "\n".join(lines[:end]).rstrip()
    args = "    Args:\n" + fields + _SHARED_ARGS
    head, raises, tail = doc.rstrip().partition("\n    Raises:\n")
    return head.rstrip() + "\n\n" + args + ("\n    Raises:\n" + tail + "\n" if raises else "")


class FitEndCallback(Callback):
    """Base of the fit-end callbacks (see the module docstring): a frozen config and the shared run.

    A subclass names its config class and its stage in the chain (``class MobileExport(FitEndCallback,
    config=ExportConfig, stage="export")``): the config's fields are documented in its ``Args:`` with the arguments
    every fit-end callback takes, and read as ``callback.config.<field>``. It logs its part of the result in
    :meth:`log_result`.
    """

    stage: ClassVar[str] = ""
    config: QuantizationConfig | ExportConfig | ReportConfig

    def __init_subclass__(cls, config: type | None = None, stage: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if config is None:
            return
        cls.stage = stage
        cls.__doc__ = _with_args(cls.__doc__ or "", config)

    def __init__(
        self,
        config: QuantizationConfig | ExportConfig | ReportConfig,
        model_attribute: str,
        on_failure: str = "raise",
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.model_attribute = check_identifier("model_attribute", model_attribute)
        self.on_failure = check_choice("on_failure", on_failure, ON_FAILURE)
        self.weights = check_choice("weights", weights, WEIGHTS, allow_none=True)
        self._run: FitEndRun | None = None

    @property
    def result(self) -> PipelineResult | None:
        """What this fit's chain produced (``None`` before fit end, and on ranks other than 0)."""
        return self._run.result if self._run is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = timm_model_of(pl_module, self.model_attribute, type(self).__name__)
        check_model = getattr(self.config, "check_model", None)
        if check_model is not None:  # e.g. float layers that match nothing: refused before training
            check_model(model)
        load_weights_only(trainer)
        warn_if_last_checkpoint_lags(trainer)
        if stage != "fit":
            return
        check_validation_data(trainer, type(self).__name__)
        self._run = FitEndRun.join(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)
        if trainer.is_global_zero and self.result is not None:
            self.log_result(trainer, self.result)
        run = self._run
        if not run.stage_logged(self.stage) or not run.shortfalls:
            return
        line = _shortfall_line(trainer, run.shortfalls)
        if any(run.policies[stage] == "raise" for stage in run.shortfalls):
            raise FitEndIncompleteError(line)
        rank_zero_warn(line)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        FitEndRun.leave(trainer)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Run the fit-end chain (once per fit; rank 0 works, every rank waits) and return this stage's part."""
        if self._run is None:
            self._run = FitEndRun.join(trainer)
        self._run.execute(trainer, pl_module)
        return self.outputs()

    def outputs(self) -> Any:
        """This stage's part of the result."""
        raise NotImplementedError

    def log_result(self, trainer: pl.Trainer, result: PipelineResult) -> None:
        """Report this stage's part on the console and to the loggers (rank 0, after the chain ran)."""
        raise NotImplementedError
