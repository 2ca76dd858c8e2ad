"""Tokens as a latency knob: searching ``r`` for a target, and pruning and merging searched one knob at a time."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch

from pqv_lightning import ViTClassifier
from pqv_lightning import latency_search as search_module
from pqv_lightning.callbacks import StructuredPruning, TokenMerging
from pqv_lightning.datamodules import DigitsDataModule
from pqv_lightning.latency_search import LatencyTarget, TokenSearch, largest_r, search_tokens
from pqv_lightning.pruning import PruningSpec
from pqv_lightning.tokens import TokenReduction, token_reduction_of, tokens_per_block
from pqv_lightning.utils.checks import InvalidArgumentError

KWARGS = {"img_size": 32, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2}


def work(model: torch.nn.Module) -> float:
    """A deterministic stand-in for a measured latency: tokens times width summed over the blocks."""
    width = model.blocks[0].mlp.fc1.out_features
    return sum(tokens_per_block(model)[:-1]) * width / 1000


@pytest.fixture
def fake_timing(monkeypatch) -> list:
    """Every trial is 'measured' as :func:`work` of the copy it would export; the copies are kept for checks."""
    seen: list[torch.nn.Module] = []

    def measure(model, example_input, target, calibration=None, what=""):
        seen.append(model)
        return work(model)

    monkeypatch.setattr(search_module, "measure_model_latency", measure)
    return seen


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **KWARGS).eval()


def test_the_search_finds_the_smallest_r_within_the_target_and_caches_trials(fake_timing) -> None:
    model = tiny()
    assert largest_r(model) == 32  # 64 patch tokens: ToMe's cap is half of them
    targets = {r: work(model_r) for r, model_r in ((r, _reduced(model, r)) for r in range(0, 33))}
    target_ms = targets[10] + 1e-6
    trials: dict[int, float] = {}
    found = search_tokens(model, TokenReduction("merge", r=0), torch.zeros(1, 1, 32, 32), LatencyTarget(target_ms),
                          trials=trials)  # fmt: skip
    assert isinstance(found, TokenSearch) and found.r == min(r for r, ms in targets.items() if ms <= target_ms)
    assert found.latency_ms == targets[found.r] and trials == found.trials and 0 in trials
    measured = len(fake_timing)
    again = search_tokens(model, TokenReduction("merge", r=0), torch.zeros(1, 1, 32, 32), LatencyTarget(target_ms),
                          trials=trials)  # fmt: skip
    assert again.r == found.r and len(fake_timing) == measured  # every trial came from the cache
    assert token_reduction_of(model) is None  # the model itself is never touched


def test_an_unreachable_target_names_what_the_largest_r_reaches(fake_timing) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"target_latency_ms=0.01 is unreachable .* by reducing tokens: r=32"):
        search_tokens(model, TokenReduction("merge", r=0), torch.zeros(1, 1, 32, 32), LatencyTarget(0.01))


def test_with_a_pending_pruning_each_trial_is_pruned_first(fake_timing) -> None:
    model = tiny()
    search_tokens(model, TokenReduction("merge", r=0), torch.zeros(1, 1, 32, 32), LatencyTarget(1e6),
                  pruning=(PruningSpec(ratio=0.5), 0.5))  # fmt: skip
    (trial,) = fake_timing
    assert trial.blocks[0].mlp.fc1.out_features < model.blocks[0].mlp.fc1.out_features


def _reduced(model: torch.nn.Module, r: int) -> torch.nn.Module:
    import copy

    from pqv_lightning.tokens import apply_token_reduction

    return apply_token_reduction(copy.deepcopy(model), TokenReduction("merge", r=r))


def _fit(tmp_path, callbacks: list) -> ViTClassifier:
    module = ViTClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=dict(KWARGS))
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(img_size=32, in_chans=1, batch_size=16))
    return module


def test_the_callback_reduces_the_searched_r_and_keeps_the_search(tmp_path, fake_timing) -> None:
    model = tiny()
    target_ms = work(_reduced(model, 12)) + 1e-6
    merging = TokenMerging(r=None, target_latency_ms=target_ms, latency_target="eager")
    module = _fit(tmp_path, [merging])
    assert merging.latency_search is not None and merging.spec.r == merging.latency_search.r > 0
    assert token_reduction_of(module.model).r == merging.spec.r
    state = merging.state_dict()
    resumed = TokenMerging(r=None, target_latency_ms=target_ms, latency_target="eager")
    resumed.load_state_dict(state)  # a resumed fit adopts the search instead of measuring again
    assert resumed.spec.r == merging.spec.r and resumed.latency_search.trials == merging.latency_search.trials


def test_a_pruning_target_measures_its_trials_reducing_tokens_at_the_fixed_r(tmp_path, fake_timing) -> None:
    model = tiny()
    target_ms = work(_reduced(model, 8)) * 0.7
    pruning = StructuredPruning(ratio=None, target_latency_ms=target_ms, latency_target="eager")
    _fit(tmp_path, [pruning, TokenMerging(r=8)])
    assert fake_timing and all(token_reduction_of(trial).r == 8 for trial in fake_timing)
    assert 0 < pruning.latency_search.ratio < 1


def test_a_latency_target_on_both_knobs_or_on_none_is_refused(tmp_path, fake_timing) -> None:
    with pytest.raises(InvalidArgumentError, match=r"r=8 is invalid; accepted: None with target_latency_ms"):
        TokenMerging(r=8, target_latency_ms=5.0)
    with pytest.raises(InvalidArgumentError, match=r"r=None is invalid"):
        TokenMerging(r=None)
    both = [
        StructuredPruning(ratio=None, target_latency_ms=5.0, latency_target="eager"),
        TokenMerging(r=None, target_latency_ms=5.0, latency_target="eager"),
    ]
    with pytest.raises(InvalidArgumentError, match=r"a latency target on one knob only: StructuredPruning"):
        _fit(tmp_path, both)
    assert not fake_timing  # refused before anything was measured
