"""GPU readiness: every callback on a CUDA device under ``precision="bf16-mixed"``, the fit-end chain after a GPU fit,
a 2-process DDP run and the quickstart recipe, each with its time per epoch and peak GPU memory.

Run: ``python benchmarks/gpu_check.py [--only TEXT ...] [--skip-quickstart] [--quickstart-epochs N] [--require-gpu]
[--threads 1] [--cpu]``

The checks are the ones ``tests/test_cuda.py`` runs (it imports them from here): tiny ViTs on the offline digits, a
few batches each, fitted on ``cuda:0``. Each asserts what the device handling promises (what a callback creates
lives on the module's device and dtype; what is exported, converted or timed is a CPU copy; the training model stays
on the GPU, untouched by the fit-end chain) and prints PASS or FAIL with the error, the seconds of each training
epoch (CUDA synchronised, the epoch-start hooks such as pruning excluded) and ``torch.cuda.max_memory_allocated``
over the fit. The DDP check runs where two CUDA devices exist. The quickstart is ``train.py fit --config
configs/quickstart.yaml`` with ``accelerator=gpu`` and ``precision=bf16-mixed`` (its own epochs, or
``--quickstart-epochs N`` with the pruning epoch scaled), timed the same way; the fit-end chain's seconds are the time
from train end to fit end.

Exit status: 0 when every check that ran passed, and on a machine without CUDA (it prints that nothing ran); 1 when a
check failed; 2 with ``--require-gpu`` on a machine without CUDA (for a CI runner that must have one).

``--cpu`` is a dry run of the checks themselves where there is no GPU: the same fits and assertions on the CPU
(``cpu`` where ``cuda:<rank>`` is expected; the DDP check on 2 CPU processes; the quickstart only with
``--quickstart-epochs``). Its figures are CPU ones and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PRECISION = "bf16-mixed"
#: Where the checks fit: ``"cuda"``; ``"cpu"`` with ``--cpu``, a dry run of the checks themselves on a machine
#: without a GPU (the same assertions with ``cpu`` for ``cuda:<rank>``; CPU figures, no GPU memory).
DEVICE = "cuda"
#: A 2-block ViT for 16 px grey digits (about 0.1M parameters): the checks test device handling, not accuracy.
MODEL_KWARGS = {"img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 64, "num_heads": 4}
TRAIN_BATCHES = 4
IMPORTANCES = ("l1", "l2", "taylor", "hessian", "random", "lamp", "fpgm", "obdc", "activation")
QAT_TARGETS = ("int8_pt2e:xnnpack", "int4_weight:xnnpack")
DENSE_QKV = 3 * MODEL_KWARGS["embed_dim"]


def cuda_missing() -> str | None:
    """Why the checks cannot run here (``None`` when they can)."""
    if not torch.cuda.is_available():
        return (
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'})"
        )
    if not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(0)} has no bf16 support, which precision={PRECISION!r} needs"
    return None


def two_cuda_missing() -> str | None:
    """Why the DDP check cannot run here (``None`` when it can)."""
    missing = cuda_missing()
    if missing is None and torch.cuda.device_count() < 2:
        return f"DDP needs two CUDA devices; this machine has {torch.cuda.device_count()}"
    return missing


def _expected(rank: int = 0) -> str:
    """The device a rank's tensors must be on."""
    return f"cuda:{rank}" if DEVICE == "cuda" else "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0


# --------------------------------------------------------------------------- fits and what they saw
@dataclass
class Measured:
    """What a check measured: seconds of each training epoch, peak GPU memory (MiB) of the fit, and a note."""

    epoch_seconds: list[float]
    peak_mib: float
    note: str = ""


def _where(module: torch.nn.Module) -> list[str]:
    """The devices (and dtypes) of a module's parameters and buffers, as ``"cuda:0/torch.float32"`` strings."""
    tensors = [*module.parameters(), *module.buffers()]
    return sorted({f"{t.device}/{t.dtype}" if t.is_floating_point() else str(t.device) for t in tensors})


def _devices(module: torch.nn.Module) -> set[str]:
    return {str(t.device) for t in (*module.parameters(), *module.buffers())}


def _make_probe(watch: dict[str, Callable[[Any, Any], Any]] | None):
    import lightning.pytorch as pl

    from pqv_lightning.utils.batches import images_of

    class DeviceProbe(pl.Callback):
        """Listed last: at the first batch of every epoch (after every other callback's epoch- and batch-start hooks)
        where the module's tensors, the optimizers' parameters and the batch are, plus ``watch``'s readings; the
        seconds of each training epoch; the training losses."""

        def __init__(self) -> None:
            self.epochs: list[dict[str, Any]] = []
            self.seconds: list[float] = []
            self.losses: list[torch.Tensor] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            _sync()
            self._start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx:
                return
            held = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
            record = {
                "epoch": trainer.current_epoch,
                "devices": sorted(_devices(pl_module)),
                "optimizer_devices": sorted({str(p.device) for p in held}),
                "optimizer_is_module": sorted(map(id, held)) == sorted(id(p) for p in pl_module.parameters()),
                "batch_device": str(images_of(batch).device),
            }
            record.update({name: read(trainer, pl_module) for name, read in (watch or {}).items()})
            self.epochs.append(record)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(loss.detach().float())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            _sync()
            self.seconds.append(time.perf_counter() - self._start)

    return DeviceProbe()


@dataclass
class Fit:
    trainer: Any
    module: Any
    probe: Any
    peak_mib: float

    def measured(self, note: str = "") -> Measured:
        return Measured(list(self.probe.seconds), self.peak_mib, note)


def _digits():
    from pqv_lightning.datamodules import DigitsDataModule

    return DigitsDataModule(img_size=16, in_chans=1, batch_size=32, augment=False)


def _fit(root: Path, callbacks: list, epochs: int, watch: dict[str, Callable[[Any, Any], Any]] | None = None) -> Fit:
    """Fit a tiny ``ViTClassifier`` on ``cuda:0`` (:data:`DEVICE`) under bf16-mixed with ``callbacks`` (a probe
    appended last)."""
    import lightning.pytorch as pl

    from pqv_lightning import ViTClassifier

    torch.manual_seed(0)
    module = ViTClassifier("vit_tiny_patch16_224", 10, model_kwargs=dict(MODEL_KWARGS), warmup_epochs=0)
    probe = _make_probe(watch)
    trainer = pl.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        precision=PRECISION,
        max_epochs=epochs,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[*callbacks, probe],
    )
    _reset_peak()
    trainer.fit(module, _digits())
    return Fit(trainer, module, probe, _peak_mib())


def _assert_trained_on_gpu(fit: Fit) -> None:
    """Every epoch trained on cuda:0: module, optimizer parameters (exactly the module's) and batch; finite losses."""
    assert fit.probe.epochs, "no training batch ran"
    device = _expected()
    for record in fit.probe.epochs:
        epoch = record["epoch"]
        assert record["devices"] == [device], f"epoch {epoch}: module tensors on {record['devices']}"
        assert record["optimizer_devices"] == [device], f"epoch {epoch}: optimizer on {record['optimizer_devices']}"
        assert record["optimizer_is_module"], f"epoch {epoch}: the optimizers do not hold exactly the module's params"
        assert record["batch_device"] == device, f"epoch {epoch}: batch on {record['batch_device']}"
    losses = torch.stack(fit.probe.losses)
    assert bool(losses.isfinite().all()), f"non-finite training loss: {losses.tolist()}"


def _params(trainer: Any, pl_module: Any) -> int:
    return sum(p.numel() for p in pl_module.model.parameters())


def _qkv(trainer: Any, pl_module: Any) -> int:
    return pl_module.model.get_parameter("blocks.0.attn.qkv.weight").shape[0]


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


# --------------------------------------------------------------------------- the checks
def check_pruning(root: Path, importance: str, at_epoch: int) -> Measured:
    """``StructuredPruning`` with ``importance`` at fit start (0) or at the start of epoch 1: the statistics,
    example inputs and calibration batches on the GPU model, and training goes on there with a clean optimizer."""
    from pqv_lightning.callbacks import StructuredPruning

    pruning = StructuredPruning(ratio=0.25, importance=importance, calibration_batches=2, at_epoch=at_epoch)
    fit = _fit(root, [pruning], epochs=2, watch={"params": _params})
    _assert_trained_on_gpu(fit)
    result = pruning.result
    assert result is not None and result.params_after < result.params_before, "nothing was pruned"
    sizes = [record["params"] for record in fit.probe.epochs]
    dense = [] if at_epoch == 0 else [result.params_before]
    assert sizes == [*dense, result.params_after, result.params_after][:2], f"parameters by epoch {sizes}"
    return fit.measured(f"params {result.params_before} -> {result.params_after}")


def check_latency_target(root: Path) -> Measured:
    """``StructuredPruning(target_latency_ms=...)`` pruning at epoch 1: the search runs at fit start, with the model
    on the GPU, and times CPU copies. The real measurement of each trial runs (a pruned CPU copy timed eagerly);
    its figure is replaced by a fixed curve (10 ms at ratio 0, linear to 0 at ratio 1) so that the ratio found does
    not depend on this machine's timing."""
    import pqv_lightning.latency_search as latency_search
    import pqv_lightning.measure as measure
    from pqv_lightning.callbacks import StructuredPruning

    searched: list[tuple[str, str]] = []
    timed: list[str] = []
    real_measure, real_runner = latency_search.measure_pruned_latency, measure.make_runner

    def measure_pruned(model, spec, ratio, example_input, target, calibration=None):
        searched.append((str(next(model.parameters()).device), str(example_input.device)))
        real_measure(model, spec, ratio, example_input, target, calibration)
        return 10.0 * (1.0 - ratio)

    def make_runner(model, *args, **kwargs):
        timed.append(str(next(model.parameters()).device))
        return real_runner(model, *args, **kwargs)

    pruning = StructuredPruning(ratio=None, target_latency_ms=8.0, latency_target="eager", at_epoch=1)
    with (
        _patched(latency_search, "measure_pruned_latency", measure_pruned),
        _patched(measure, "make_runner", make_runner),
    ):
        fit = _fit(root, [pruning], epochs=2, watch={"params": _params})
    _assert_trained_on_gpu(fit)
    assert searched, "the latency search measured nothing"
    assert {model for model, _ in searched} == {_expected()}, f"the search got the model on {searched}"
    assert {example for _, example in searched} == {"cpu"}, f"the search's example inputs were on {searched}"
    assert timed and set(timed) == {"cpu"}, f"the timed copies were on {timed}"
    search = pruning.latency_search
    assert search is not None and 0.1 < search.ratio < 0.3, f"ratio {search and search.ratio} (expected about 0.2)"
    assert pruning.result is not None and pruning.result.ratio == search.ratio
    sizes = [record["params"] for record in fit.probe.epochs]
    assert sizes == [pruning.result.params_before, pruning.result.params_after], f"parameters by epoch {sizes}"
    return fit.measured(f"ratio {search.ratio:.4g} after {len(search.trials)} trials timed on CPU copies")


def check_sparsity_gates(root: Path) -> Measured:
    """``SparsityGates``: gates on the GPU (trained, L1-penalised) in epoch 0, folded and pruned at epoch 1."""
    from pqv_lightning.callbacks import SparsityGates
    from pqv_lightning.pruning.gates import gates_of

    gates = SparsityGates(ratio=0.25, prune_epoch=1, l1_lambda=1e-3)

    def gate_places(trainer, pl_module) -> list[str]:
        return sorted({f"{g.device}/{g.dtype}" for g in gates_of(pl_module.model).values()})

    fit = _fit(root, [gates], epochs=2, watch={"gates": gate_places, "qkv": _qkv})
    _assert_trained_on_gpu(fit)
    seen = [(record["gates"], record["qkv"]) for record in fit.probe.epochs]
    assert seen[0] == ([f"{_expected()}/torch.float32"], DENSE_QKV), f"epoch 0: gates and qkv width {seen[0]}"
    assert seen[1][0] == [] and seen[1][1] < DENSE_QKV, f"epoch 1: gates and qkv width {seen[1]}"
    assert gates.result is not None
    return fit.measured(f"params {gates.result.params_before} -> {gates.result.params_after}")


def check_distillation(root: Path, at_epoch: int) -> Measured:
    """``KnowledgeDistillation`` with pruning at fit start (the teacher is captured on the CPU in ``setup`` and must
    move to the GPU) or at epoch 1 (captured from the GPU model): the teacher sits on the GPU in float32, the term
    is finite, and its side file holds CPU tensors."""
    from pqv_lightning.callbacks import KnowledgeDistillation, StructuredPruning

    kd = KnowledgeDistillation()

    def teacher_places(trainer, pl_module) -> list[str]:
        return _where(kd.teacher) if kd.teacher is not None else []

    pruning = StructuredPruning(ratio=0.25, at_epoch=at_epoch)
    fit = _fit(root, [pruning, kd], epochs=2, watch={"teacher": teacher_places})
    _assert_trained_on_gpu(fit)
    places = [record["teacher"] for record in fit.probe.epochs]
    assert places[-1] == [f"{_expected()}/torch.float32"], f"teacher tensors by epoch: {places}"
    assert at_epoch == 1 or places[0] == places[-1], f"teacher tensors by epoch: {places}"
    term = fit.trainer.callback_metrics.get("train/distill_term")
    assert term is not None and math.isfinite(float(term)) and float(term) > 0, f"distillation term {term}"
    assert kd.teacher_file is not None and kd.teacher_file.is_file(), "no teacher file"
    saved = torch.load(kd.teacher_file, weights_only=True)  # no map_location: tensors return where they were saved
    assert {str(v.device) for v in saved.values()} == {"cpu"}, "the teacher file holds GPU tensors"
    return fit.measured(f"distillation term {float(term):.4g}")


def check_qat(root: Path, target: str) -> Measured:
    """``QuantizationAwareTraining`` from epoch 1 after pruning at epoch 1: the fake-quantized model trains on the
    GPU under bf16 autocast; at train end the converted variant and the float model with the trained weights are CPU
    modules that run on CPU images."""
    from pqv_lightning.callbacks import QuantizationAwareTraining, StructuredPruning

    qat = QuantizationAwareTraining(target, start_epoch=1)
    watch = {"active": lambda trainer, pl_module: qat.active}
    fit = _fit(root, [StructuredPruning(ratio=0.25, at_epoch=1), qat], epochs=2, watch=watch)
    _assert_trained_on_gpu(fit)
    assert [record["active"] for record in fit.probe.epochs] == [False, True], "fake quantization did not start"
    assert qat.result is not None, "no QAT result"
    variant, float_model = qat.result.variant.module, qat.result.float_model
    assert _devices(variant) <= {"cpu"} and _devices(float_model) == {"cpu"}, (
        f"variant on {_devices(variant)}, float model on {_devices(float_model)}"
    )
    images = next(iter(_val_loader()))[0][:4].float()
    with torch.no_grad():
        logits = variant(images)
    assert logits.shape == (4, 10) and bool(logits.isfinite().all()), "the converted variant does not run on the CPU"
    return fit.measured(f"converted {qat.result.variant.name}; epoch 1 includes building the graph on the CPU")


def _val_loader():
    data = _digits()
    data.setup("fit")
    return data.val_dataloader()


class _ChainWatch:
    """Around the fit-end chain (between the ``on_fit_end`` of a callback listed first and of one listed last):
    the devices of every module and example that ``torch.export`` / ``torch.onnx`` / ``torch.jit`` get, every call
    that would move a module or tensor to CUDA, and the training model before and after (devices, storage, sums).

    Lightning moves the module to the CPU in its teardown, before any ``on_fit_end``: the chain starts from that
    CPU module, and must neither change it nor put anything on the GPU."""

    def __init__(self) -> None:
        self.exported: list[tuple[str, set[str]]] = []
        self.to_cuda: list[str] = []
        self.before: dict[str, tuple] | None = None
        self.after: dict[str, tuple] | None = None
        self._stack = contextlib.ExitStack()

    @staticmethod
    def snapshot(pl_module: Any) -> dict[str, tuple]:
        with torch.no_grad():
            return {
                name: (str(p.device), p.data_ptr(), float(p.double().sum()))
                for name, p in pl_module.model.named_parameters()
            }

    def _record_export(self, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            where: set[str] = set()
            for value in (*args, *kwargs.values()):
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(item, torch.nn.Module):
                        where |= _devices(item)
                    elif isinstance(item, torch.Tensor):
                        where.add(str(item.device))
            self.exported.append((f"{function.__module__}.{function.__name__}", where))
            return function(*args, **kwargs)

        return wrapper

    def open(self, pl_module: Any) -> None:
        self.before = self.snapshot(pl_module)
        module_to, module_cuda, tensor_cuda = torch.nn.Module.to, torch.nn.Module.cuda, torch.Tensor.cuda
        watch = self

        def to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None and device.type == "cuda":
                watch.to_cuda.append(f"{type(module).__name__}.to({device})")
            return module_to(module, *args, **kwargs)

        def cuda(module, *args, **kwargs):
            watch.to_cuda.append(f"{type(module).__name__}.cuda()")
            return module_cuda(module, *args, **kwargs)

        def tensor_to_cuda(tensor, *args, **kwargs):
            watch.to_cuda.append("Tensor.cuda()")
            return tensor_cuda(tensor, *args, **kwargs)

        for owner, name, value in (
            (torch.export, "export", self._record_export(torch.export.export)),
            (torch.onnx, "export", self._record_export(torch.onnx.export)),
            (torch.jit, "trace", self._record_export(torch.jit.trace)),
            (torch.jit, "script", self._record_export(torch.jit.script)),
            (torch.nn.Module, "to", to),
            (torch.nn.Module, "cuda", cuda),
            (torch.Tensor, "cuda", tensor_to_cuda),
        ):
            self._stack.enter_context(_patched(owner, name, value))

    def close(self, pl_module: Any) -> None:
        self._stack.close()
        self.after = self.snapshot(pl_module)

    def callbacks(self) -> tuple[Any, Any]:
        import lightning.pytorch as pl

        watch = self

        class ChainOpens(pl.Callback):
            def on_fit_end(self, trainer, pl_module) -> None:
                watch.open(pl_module)

        class ChainCloses(pl.Callback):
            def on_fit_end(self, trainer, pl_module) -> None:
                watch.close(pl_module)

        return ChainOpens(), ChainCloses()


def check_fit_end_chain(root: Path) -> Measured:
    """Pruning (Taylor) at epoch 1 with distillation, then ``Quantization``, ``MobileExport`` (ONNX, ``.pte``) and
    ``TradeoffReport`` after the GPU fit: every export takes CPU tensors, nothing is moved to CUDA, the quantized
    variants are CPU modules, every file verifies, the report is written, and the training model is left as the
    chain found it (same device, storage and values; Lightning itself moves it to the CPU before ``on_fit_end``)."""
    from pqv_lightning.callbacks import (
        KnowledgeDistillation,
        MobileExport,
        Quantization,
        StructuredPruning,
        TradeoffReport,
    )

    watch = _ChainWatch()
    opens, closes = watch.callbacks()
    quantization = Quantization(["int8_dynamic:x86", "int8_pt2e:xnnpack"], calibration_batches=2)
    # fp32 files: a quantized file of this barely trained model can miss the 0.97 top-1 agreement with the float
    # model by chance (on the CPU run of this check: ONNX int8 0.86, .pte int8 0.95, TorchScript int8_dynamic 0.94),
    # which says nothing about devices. The int8 variants are built and calibrated (CPU copies) above.
    artifacts = {"onnx": ["fp32"], "executorch": ["fp32"], "torchscript": ["fp32"]}
    export = MobileExport(artifacts, val_batches=2, calibration_batches=2)
    report = TradeoffReport(threads=1, warmup=1, runs=3, batch=None, memory=False, profile=None)
    pruning = StructuredPruning(ratio=0.25, importance="taylor", calibration_batches=2, at_epoch=1)
    callbacks = [opens, pruning, KnowledgeDistillation(), quantization, export, report, closes]
    start = time.perf_counter()
    fit = _fit(root, callbacks, epochs=2)
    seconds = time.perf_counter() - start
    _assert_trained_on_gpu(fit)
    assert watch.before is not None and watch.after is not None, "the fit-end hooks did not run"
    assert watch.after == watch.before, "the fit-end chain moved or changed the training model"
    assert not watch.to_cuda, f"the fit-end chain moved to CUDA: {watch.to_cuda[:5]}"
    assert any(where == {"cpu"} for _, where in watch.exported), f"no CPU export seen: {watch.exported}"
    off_cpu = [(name, where) for name, where in watch.exported if not where <= {"cpu"}]
    assert not off_cpu, f"exported from a non-CPU model or input: {off_cpu[:5]}"
    at_fit_end = sorted({device for device, _, _ in watch.before.values()})
    variants = [r for r in quantization.results if r.quantized is not None]
    assert variants and all(r.error is None for r in quantization.results), [r.error for r in quantization.results]
    for r in variants:
        assert _devices(r.quantized.module) <= {"cpu"}, f"{r.name} on {_devices(r.quantized.module)}"
    statuses = {r.name: r.status if r.status == "ok" else f"{r.status}: {r.reason}" for r in export.records}
    assert statuses and set(statuses.values()) == {"ok"}, statuses
    reports = list(Path(root).rglob("report*.md"))
    assert reports, f"no report under {root}"
    return fit.measured(
        f"{len(statuses)} files verified, {len(watch.exported)} exports, all from the CPU; model on "
        f"{at_fit_end} at fit end, unchanged by the chain; fit {seconds:.0f} s"
    )


DDP_PROBE = '''
import json
import os
import time

import torch
from lightning.pytorch import Callback

from pqv_lightning.checkpoint import current_structure


class RankProbe(Callback):
    """Per rank: the devices of each epoch's first batch (module, optimizer, batch), epoch seconds, the peak GPU
    memory, and at train end the state, the structure and the teacher's devices."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.epochs, self.seconds, self.start = out_dir, [], [], 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        held = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
        self.epochs.append({
            "devices": sorted({str(t.device) for t in (*pl_module.parameters(), *pl_module.buffers())}),
            "optimizer_devices": sorted({str(p.device) for p in held}),
            "batch_device": str(batch[0].device),
        })

    def on_train_end(self, trainer, pl_module):
        kd = [cb for cb in trainer.callbacks if type(cb).__name__ == "KnowledgeDistillation"]
        teacher = kd[0].teacher if kd else None
        report = {
            "epochs": self.epochs,
            "seconds": self.seconds,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
            "structure": current_structure(pl_module.model),
            "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "teacher_devices": sorted({str(p.device) for p in teacher.parameters()}) if teacher is not None else [],
        }
        torch.save(report, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
'''


def _ddp_config(root: Path) -> str:
    return textwrap.dedent(
        f"""\
        seed_everything: 0
        trainer:
          accelerator: {"gpu" if DEVICE == "cuda" else "cpu"}
          devices: 2
          strategy: ddp
          precision: {PRECISION}
          max_epochs: 2
          limit_train_batches: {TRAIN_BATCHES}
          limit_val_batches: 2
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: "{root}"
          callbacks:
            - class_path: pqv_lightning.callbacks.StructuredPruning
              init_args: {{ratio: 0.25, importance: taylor, calibration_batches: 2, at_epoch: 1}}
            - class_path: pqv_lightning.callbacks.KnowledgeDistillation
            - class_path: pqv_lightning.callbacks.MobileExport
              init_args: {{artifacts: {{onnx: [fp32]}}, val_batches: 2}}
            - class_path: gpu_ddp_probe.RankProbe
              init_args: {{out_dir: "{root}"}}
        model:
          class_path: pqv_lightning.ViTClassifier
          init_args:
            model_name: vit_tiny_patch16_224
            num_classes: 10
            model_kwargs: {json.dumps(MODEL_KWARGS)}
            warmup_epochs: 0
        data:
          class_path: pqv_lightning.datamodules.DigitsDataModule
          init_args: {{img_size: 16, in_chans: 1, batch_size: 32, augment: false}}
        """
    )


def check_ddp(root: Path) -> Measured:
    """``train.py fit`` under 2-process DDP on two GPUs (bf16-mixed): Taylor pruning at epoch 1 (statistics
    all-reduced on the GPUs, rank 0 decides), distillation, and an ONNX export on rank 0. Each rank trains on its own
    device, both end with the identical network, the teacher follows each rank's device, the file verifies."""
    root = Path(root)
    (root / "gpu_ddp_probe.py").write_text(DDP_PROBE)
    config = root / "ddp.yaml"
    config.write_text(_ddp_config(root))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, f"train.py failed (rc {done.returncode}): {done.stderr[-3000:]}"
    reports = [torch.load(root / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        device = _expected(rank)
        assert len(report["epochs"]) == 2, f"rank {rank}: {len(report['epochs'])} epochs"
        for record in report["epochs"]:
            assert record["devices"] == [device], f"rank {rank}: module on {record['devices']}"
            assert record["optimizer_devices"] == [device], f"rank {rank}: {record['optimizer_devices']}"
            assert record["batch_device"] == device, f"rank {rank}: batch on {record['batch_device']}"
        assert report["teacher_devices"] == [device], f"rank {rank}: teacher on {report['teacher_devices']}"
    first, second = (report["state"] for report in reports)
    assert reports[0]["structure"] is not None and reports[0]["structure"] == reports[1]["structure"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), "ranks differ"
    manifest = json.loads((root / "artifacts" / "manifest.json").read_text())
    statuses = {a["name"]: a["status"] for a in manifest["artifacts"]}
    assert statuses == {"onnx-fp32": "ok"}, statuses
    peak = max(report["peak_mib"] for report in reports)
    return Measured(reports[0]["seconds"], peak, "identical network on both ranks; peak is the larger rank's")


def checks(two_devices: bool) -> list[tuple[str, Callable[[Path], Measured]]]:
    """Every check by name (the DDP one only with ``two_devices``)."""
    found: list[tuple[str, Callable[[Path], Measured]]] = []
    for at_epoch, when in ((0, "fit start"), (1, "epoch 1")):
        for importance in IMPORTANCES:
            check = lambda r, i=importance, e=at_epoch: check_pruning(r, i, e)  # noqa: E731
            found.append((f"pruning at {when}, {importance}", check))
    found.append(("pruning to a latency target", check_latency_target))
    found.append(("sparsity gates", check_sparsity_gates))
    found += [(f"distillation, pruning at epoch {e}", lambda r, e=e: check_distillation(r, e)) for e in (0, 1)]
    found += [(f"QAT {t}", lambda r, t=t: check_qat(r, t)) for t in QAT_TARGETS]
    found.append(("fit-end chain after a GPU fit", check_fit_end_chain))
    if two_devices:
        found.append(("DDP on 2 GPUs", check_ddp))
    return found


# --------------------------------------------------------------------------- the quickstart
GPU_LOG = '''
import json
import time

import torch
from lightning.pytorch import Callback


class GpuLog(Callback):
    """Listed last: each training epoch's seconds (CUDA synchronised), val/top1 after each epoch, the peak GPU
    memory, and the seconds from train end to the end of the fit-end chain (every other on_fit_end runs first)."""

    def __init__(self, path: str) -> None:
        self.path, self.seconds, self.top1, self.start, self.train_end = path, [], [], 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val/top1" in trainer.callback_metrics:
            self.top1.append(float(trainer.callback_metrics["val/top1"]))

    def on_train_end(self, trainer, pl_module):
        self.train_end = time.perf_counter()
        self.device = str(pl_module.device)
        self.peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0

    def on_fit_end(self, trainer, pl_module):
        with open(self.path, "w") as f:
            json.dump({"seconds": self.seconds, "top1": self.top1, "peak_mib": self.peak, "device": self.device,
                       "fit_end_seconds": time.perf_counter() - self.train_end}, f)
'''


def run_quickstart(work: Path, epochs: int | None) -> tuple[bool, str]:
    """``train.py fit`` on the quickstart recipe with accelerator=gpu, bf16-mixed; (passed, lines to print)."""
    import yaml

    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    trainer = recipe["trainer"]
    trainer.update(
        accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision=PRECISION, enable_progress_bar=False
    )
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(work / "runs"), "name": "quickstart"}}  # fmt: skip
    if epochs is not None:  # the pruning epoch (and the schedule restart there) scaled with the epochs
        old = trainer["max_epochs"]
        scale = lambda epoch: max(1, min(epochs - 1, round(epoch * epochs / old)))  # noqa: E731
        trainer["max_epochs"] = epochs
        for callback in trainer["callbacks"]:
            args = callback.get("init_args") or {}
            for key in ("at_epoch", "prune_epoch", "start_epoch"):
                if args.get(key):
                    args[key] = scale(args[key])
        model_args = recipe["model"].get("init_args", {})
        if model_args.get("restart_epochs"):
            model_args["restart_epochs"] = [scale(e) for e in model_args["restart_epochs"]]
    log = work / "gpu_log.json"
    trainer["callbacks"].append({"class_path": "gpu_log.GpuLog", "init_args": {"path": str(log)}})
    (work / "gpu_log.py").write_text(GPU_LOG)
    config = work / "quickstart_gpu.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config)], cwd=work,
                          env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0 or not log.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return False, f"FAIL  quickstart (rc {done.returncode}, {wall:.0f} s):\n{textwrap.indent(tail, '      ')}"
    got = json.loads(log.read_text())
    seconds = got["seconds"]
    peak = f"{got['peak_mib']:.1f} MiB" if DEVICE == "cuda" else "n/a"
    top1 = f"; val/top1 of the last epoch {100 * got['top1'][-1]:.2f}%" if got["top1"] else ""
    lines = [
        f"PASS  quickstart ({trainer['max_epochs']} epochs on {got['device']}, {PRECISION}): {wall:.0f} s in all",
        f"      time per epoch: median {statistics.median(seconds):.2f} s (first {seconds[0]:.2f} s, min "
        f"{min(seconds):.2f} s, max {max(seconds):.2f} s); peak GPU memory {peak}",
        f"      fit-end chain (quantize, export, report on CPU copies): {got['fit_end_seconds']:.0f} s{top1}",
    ]
    return True, "\n".join(lines)


# --------------------------------------------------------------------------- main
def _gpu_lines() -> list[str]:
    import lightning

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
             f"lightning {lightning.__version__}"]  # fmt: skip
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run the checks whose name contains one of these")
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--quickstart-epochs", type=int, default=None, help="shorten the quickstart to N epochs")
    parser.add_argument("--require-gpu", action="store_true", help="exit with 2 where there is no CUDA device")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the fit-end chain and the search")
    parser.add_argument("--cpu", action="store_true", help="dry run of the checks on the CPU (no GPU figures)")
    args = parser.parse_args()
    if args.quickstart_epochs is not None and args.quickstart_epochs < 2:
        parser.error(f"--quickstart-epochs={args.quickstart_epochs} is invalid; accepted: an int >= 2")
    from _common import header

    global DEVICE
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: quieted after it)

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "pqv_lightning"):  # one line a check, not Lightning's chatter
        logging.getLogger(name).setLevel(logging.ERROR)
    print(header(args.threads))
    missing = cuda_missing()
    names = [name for name, _ in checks(two_devices=True)]
    if args.cpu:
        DEVICE = "cpu"
        print(f"torch {torch.__version__}: DRY RUN on the CPU (--cpu): the checks' logic, not a GPU")
        two_missing = None
    elif missing is not None:
        print(f"{missing}: nothing ran ({len(names)} checks and the quickstart skipped).")
        return 2 if args.require_gpu else 0
    else:
        print("\n".join(_gpu_lines()))
        two_missing = two_cuda_missing()
    selected = [(n, f) for n, f in checks(two_missing is None)
                if args.only is None or any(text in n for text in args.only)]  # fmt: skip
    if two_missing is not None:
        print(f"skipped: DDP on 2 GPUs ({two_missing})")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="pqv-gpu-check-") as work:
        for index, (name, check) in enumerate(selected):
            root = Path(work) / f"check{index}"
            root.mkdir()
            start = time.perf_counter()
            try:
                measured = check(root)
            except Exception as err:
                failed += 1
                where = traceback.extract_tb(err.__traceback__)[-1]
                print(f"FAIL  {name} ({time.perf_counter() - start:.0f} s): {type(err).__name__}: "
                      f"{str(err).strip()[:600]} [{Path(where.filename).name}:{where.lineno}]")  # fmt: skip
                continue
            epochs = ", ".join(f"{s:.2f}" for s in measured.epoch_seconds)
            peak = f"{measured.peak_mib:.1f} MiB" if DEVICE == "cuda" else "n/a"
            print(f"PASS  {name} ({time.perf_counter() - start:.0f} s): epochs {epochs} s; peak GPU memory {peak}; "
                  f"{measured.note}")  # fmt: skip
        wanted = args.only is None or any(text in "quickstart" for text in args.only)
        if not args.skip_quickstart and (not args.cpu or args.quickstart_epochs is not None) and wanted:
            root = Path(work) / "quickstart"
            root.mkdir()
            passed, text = run_quickstart(root, args.quickstart_epochs)
            failed += not passed
            print(text)
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
