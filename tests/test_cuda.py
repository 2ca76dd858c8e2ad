"""The callbacks on a CUDA device under ``precision="bf16-mixed"`` (issue 25, item 1): pruning at fit start and at
epoch K with every importance, pruning to a latency target (timed on CPU copies), sparsity gates, distillation,
quantization-aware training, the fit-end chain after a GPU fit, and a 2-process DDP run on two GPUs.

The checks live in ``benchmarks/gpu_check.py`` (which also times them and runs the quickstart); each one fits a tiny
ViT on ``cuda:0`` and raises ``AssertionError`` naming what was on the wrong device. Every test here is marked
``cuda`` and skipped, with the reason, where there is no CUDA device (or, for DDP, fewer than two).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check

_NO_CUDA = gpu_check.cuda_missing()
_NO_TWO_CUDA = gpu_check.two_cuda_missing()

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_NO_CUDA is not None, reason=str(_NO_CUDA))]


@pytest.mark.parametrize("importance", gpu_check.IMPORTANCES)
@pytest.mark.parametrize("at_epoch", [0, 1], ids=["fit_start", "epoch_1"])
def test_pruning_on_the_gpu(tmp_path: Path, importance: str, at_epoch: int) -> None:
    measured = gpu_check.check_pruning(tmp_path, importance, at_epoch)
    assert len(measured.epoch_seconds) == 2 and measured.peak_mib > 0


def test_a_latency_target_is_searched_on_cpu_copies_of_the_gpu_model(tmp_path: Path) -> None:
    gpu_check.check_latency_target(tmp_path)


def test_sparsity_gates_train_and_prune_on_the_gpu(tmp_path: Path) -> None:
    gpu_check.check_sparsity_gates(tmp_path)


@pytest.mark.parametrize("at_epoch", [0, 1], ids=["teacher_from_setup", "teacher_from_epoch_1"])
def test_the_teacher_follows_the_student_to_the_gpu(tmp_path: Path, at_epoch: int) -> None:
    gpu_check.check_distillation(tmp_path, at_epoch)


@pytest.mark.parametrize("target", gpu_check.QAT_TARGETS)
def test_quantization_aware_training_on_the_gpu_converts_on_the_cpu(tmp_path: Path, target: str) -> None:
    gpu_check.check_qat(tmp_path, target)


@pytest.mark.slow
def test_the_fit_end_chain_after_a_gpu_fit_exports_and_measures_cpu_copies(tmp_path: Path) -> None:
    gpu_check.check_fit_end_chain(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(_NO_TWO_CUDA is not None, reason=str(_NO_TWO_CUDA))
def test_ddp_on_two_gpus_prunes_distils_and_exports_alike(tmp_path: Path) -> None:
    measured = gpu_check.check_ddp(tmp_path)
    assert len(measured.epoch_seconds) == 2
