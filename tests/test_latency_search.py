"""Pruning to a measured latency: the ratio search (cached, refusing an unreachable target before training), the
real measurement on exported files, and StructuredPruning(target_latency_ms=...) in a fit, resumed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning import latency_search as ls
from pqv_lightning.callbacks import StructuredPruning
from pqv_lightning.checkpoint import current_structure
from pqv_lightning.latency_search import LatencySearch, LatencyTarget, measure_pruned_latency, search_ratio
from pqv_lightning.pruning import PruningSpec, count_macs_params, largest_ratio
from pqv_lightning.utils.checks import InvalidArgumentError


def fake_latency(ratio: float) -> float:
    """A latency falling with the ratio, as a pruned file's does: 10 ms dense, 1 ms at ratio 0.9375."""
    return 10.0 - 9.6 * ratio


@pytest.fixture
def tiny(tiny_vit_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **tiny_vit_kwargs).eval()


def test_the_search_finds_the_smallest_ratio_within_the_target_and_caches_every_trial(tiny) -> None:
    spec, x = PruningSpec(ratio=0.0), torch.randn(1, 1, 16, 16)
    calls: list[float] = []

    def measure(ratio: float) -> float:
        calls.append(ratio)
        return fake_latency(ratio)

    trials: dict[float, float] = {}
    found = search_ratio(tiny, spec, x, LatencyTarget(5.0, "eager"), measure=measure, trials=trials)
    assert found.latency_ms <= 5.0 and fake_latency(found.ratio - 1 / 64) > 5.0  # the smallest, to 1/64
    assert found.ratio == pytest.approx(5 / 9.6, abs=1 / 64) and found.trials == trials
    assert len(calls) == len(set(calls)) == 8  # both ends and 6 bisection steps, each measured once
    again = search_ratio(tiny, spec, x, LatencyTarget(5.0, "eager"), measure=measure, trials=trials)
    assert again.ratio == found.ratio and len(calls) == 8  # all cached
    assert search_ratio(tiny, spec, x, LatencyTarget(20.0, "eager"), measure=measure).ratio == 0.0
    assert found.as_dict()["trials"][0] == [0.0, 10.0]


def test_an_unreachable_target_names_what_the_most_pruned_model_reaches(tiny) -> None:
    spec = PruningSpec(ratio=0.0)
    hi = largest_ratio(tiny, spec)
    expected = (r"target_latency_ms=0.1 is unreachable for eager at 1 thread on this CPU: the most this model can be "
                rf"pruned \(ratio {hi:.4g}\) runs in .* accepted: a target >=")  # fmt: skip
    with pytest.raises(ValueError, match=expected):
        search_ratio(tiny, spec, torch.randn(1, 1, 16, 16), LatencyTarget(0.1, "eager"), measure=fake_latency)


def test_bad_targets_are_refused_with_what_is_accepted() -> None:
    accepted = "latency_target='tflite' is invalid; accepted: eager, torchscript-fp32"
    with pytest.raises(InvalidArgumentError, match=accepted):
        LatencyTarget(5.0, "tflite")
    with pytest.raises(InvalidArgumentError, match="target_latency_ms=-1"):
        LatencyTarget(-1)
    with pytest.raises(ValueError, match=r"either ratio or target_latency_ms=5.0, not both; set ratio=None"):
        StructuredPruning(target_latency_ms=5.0)
    with pytest.raises(ValueError, match=r"either target_macs or target_latency_ms"):
        StructuredPruning(ratio=None, target_macs=1e6, target_latency_ms=5.0)
    with pytest.raises(InvalidArgumentError, match="threads=0"):
        StructuredPruning(ratio=None, target_latency_ms=5.0, threads=0)


@pytest.mark.parametrize("artifact", ["eager", "onnx-int8"])
def test_the_measurement_times_the_pruned_file_in_its_runtime_and_restores_threads(tiny, artifact) -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, 1, 16, 16)
    macs = count_macs_params(tiny, x)[0]
    target = LatencyTarget(1.0, artifact, threads=2, warmup=1, runs=3)
    ms = measure_pruned_latency(tiny, PruningSpec(ratio=0.0), 0.5, x, target)
    assert ms > 0 and torch.get_num_threads() == 1
    assert count_macs_params(tiny, x)[0] == macs  # a copy was pruned, not the model


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
               "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "default_root_dir": tmp_path, **kwargs}  # fmt: skip
    return pl.Trainer(**options)


def test_the_callback_prunes_to_the_searched_ratio_and_records_the_latency(
    tiny_vit_kwargs, digits, tmp_path, monkeypatch
) -> None:
    calls: list[float] = []
    monkeypatch.setattr(ls, "measure_pruned_latency", lambda *a, **k: calls.append(a[2]) or fake_latency(a[2]))
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(tiny_vit_kwargs))
    pruning = StructuredPruning(ratio=None, target_latency_ms=5.0, latency_target="executorch-int8", at_epoch=1)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[pruning, checkpoint])
    trainer.fit(module, datamodule=digits)
    search = pruning.latency_search
    assert search is not None and search.latency_ms <= 5.0 and pruning.result.ratio == search.ratio
    assert current_structure(module.model)["ratio"] == search.ratio
    assert pruning.summary["latency_ms"] == search.latency_ms and pruning.summary["latency_target"] == "executorch-int8"
    measured = len(calls)

    # Resumed from the checkpoint of the dense epoch: the search comes back with the state, nothing is re-measured.
    first = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    stored = torch.load(first, weights_only=True)["callbacks"]
    assert any("latency_search" in state for state in stored.values())
    resumed_module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(tiny_vit_kwargs))
    resumed = StructuredPruning(ratio=None, target_latency_ms=5.0, latency_target="executorch-int8", at_epoch=1)
    _trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(resumed_module, datamodule=digits, ckpt_path=first)
    assert len(calls) == measured and resumed.latency_search.ratio == search.ratio
    assert current_structure(resumed_module.model) == current_structure(module.model)


def test_an_unreachable_latency_is_refused_before_the_first_training_step(
    tiny_vit_kwargs, digits, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(ls, "measure_pruned_latency", lambda *a, **k: fake_latency(a[2]))
    steps: list[int] = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            steps.append(trainer.global_step)

    module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(tiny_vit_kwargs))
    for at_epoch in (0, 1):
        pruning = StructuredPruning(ratio=None, target_latency_ms=0.5, latency_target="eager", at_epoch=at_epoch)
        with pytest.raises(ValueError, match=r"target_latency_ms=0\.5 is unreachable for eager"):
            _trainer(tmp_path, max_epochs=2, callbacks=[pruning, Steps()]).fit(module, datamodule=digits)
    assert steps == []


def test_the_most_pruned_trial_keeps_a_channel_of_the_narrowest_group() -> None:
    # head_dim 64: the largest ratio is 63/64 = 0.984375; a trial ratio rounded *up* to 0.9844 would keep
    # 64 * 0.0156 < 1 channel and the prune would refuse it (seen on the quickstart ViT)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                              in_chans=1, depth=1, embed_dim=192, num_heads=3).eval()  # fmt: skip
    spec = PruningSpec(ratio=0.0)
    assert largest_ratio(model, spec) == pytest.approx(63 / 64)
    target = LatencyTarget(1e-6, "eager", warmup=0, runs=1)
    with pytest.raises(ValueError, match=r"unreachable .* \(ratio 0\.9844\) runs in"):
        search_ratio(model, spec, torch.randn(1, 1, 16, 16), target)  # measured for real, at both ends


def test_a_search_saved_before_rounds_existed_reads_back_with_the_default() -> None:
    saved = LatencySearch(0.25, 3.0, LatencyTarget(4.0, "onnx-int8"), {0.0: 5.0, 0.25: 3.0}).as_dict()
    del saved["rounds"]
    restored = LatencySearch.from_dict(saved)
    assert restored.target.rounds == LatencyTarget(4.0).rounds
    assert (restored.ratio, restored.trials) == (0.25, {0.0: 5.0, 0.25: 3.0})


def test_a_trial_slower_than_a_less_pruned_one_is_measured_again(tiny) -> None:
    """One slow reading (a busy spell of the machine) must not push the search to over-prune."""
    spec, x = PruningSpec(ratio=0.0), torch.randn(1, 1, 16, 16)
    calls: list[float] = []
    slow_once = {"left": 1}

    def measure(ratio: float) -> float:
        calls.append(ratio)
        if 0.4 < ratio < 0.5 and slow_once["left"]:  # the first bisection step below the answer reads slow
            slow_once["left"] -= 1
            return 20.0
        return fake_latency(ratio)

    found = search_ratio(tiny, spec, x, LatencyTarget(5.0, "eager"), measure=measure)
    assert found.ratio == pytest.approx(5 / 9.6, abs=1 / 64) and fake_latency(found.ratio - 1 / 64) > 5.0
    repeated = [r for r in set(calls) if calls.count(r) == 2]
    assert len(repeated) == 1 and 0.4 < repeated[0] < 0.5
    assert found.trials[repeated[0]] == pytest.approx(fake_latency(repeated[0]))
