"""An eager timing variant that reduces tokens: ``load_eager_model(tokens=...)``, the probe's ``--tokens`` and the
benchmarks' ``Variant(tokens=...)`` rebuild the reducing model (structure replayed first, then the reduction) in the
worker process, so the benchmark times what it names."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import Variant, interleaved_process_latency

from pqv_lightning.export import probe
from pqv_lightning.export.eager import load_eager_model
from pqv_lightning.pruning import PruningSpec, prune
from pqv_lightning.tokens import TokenReduction, apply_token_reduction, token_reduction_of, tokens_per_block
from pqv_lightning.utils.checks import InvalidArgumentError

MODEL = "vit_tiny_patch16_224"
SPEC = TokenReduction("merge", r=4)
#: 16 px grey images in 4 px patches: 16 patch tokens and the class token.
KWARGS = {"num_classes": 10, "img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 64,
          "num_heads": 4}  # fmt: skip


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ViT pruned by 25 %: the model, its state_dict and its structure files."""
    work = tmp_path_factory.mktemp("probe_tokens")
    kwargs = dict(KWARGS)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, **kwargs).eval()
    result = prune(model, PruningSpec(ratio=0.25, importance="l2"), torch.randn(1, 1, 16, 16))
    model.eval()
    (work / "structure.json").write_text(json.dumps(result.structure))
    torch.save(model.state_dict(), work / "state.pt")
    files = {"state": str(work / "state.pt"), "structure": str(work / "structure.json")}
    return {"model": model, "kwargs": kwargs, **files}


def test_load_eager_model_replays_the_structure_then_reduces_tokens(pruned: dict) -> None:
    loaded = load_eager_model(MODEL, pruned["state"], pruned["kwargs"], pruned["structure"], SPEC.as_dict())
    assert token_reduction_of(loaded) == SPEC and tokens_per_block(loaded) == [17, 13, 9]
    reference = apply_token_reduction(copy.deepcopy(pruned["model"]), SPEC)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))
        assert not torch.allclose(loaded(x), pruned["model"](x), atol=1e-4)  # merging changes the function
    plain = load_eager_model(MODEL, pruned["state"], pruned["kwargs"], pruned["structure"])
    assert token_reduction_of(plain) is None


def test_the_worker_process_runs_the_reducing_model(pruned: dict) -> None:
    variant = Variant(
        "eager", pruned["state"], model=MODEL, model_kwargs=pruned["kwargs"], structure=pruned["structure"],
        tokens=SPEC.as_dict(),
    )  # fmt: skip
    plain = Variant("eager", pruned["state"], model=MODEL, model_kwargs=pruned["kwargs"], structure=pruned["structure"])
    ready: dict[str, str] = {}
    stats = interleaved_process_latency({"merged": variant, "plain": plain}, [1, 1, 16, 16], 1, 0, 2, 1, ready=ready)
    assert json.loads(ready["merged"]) == {"tokens": {"method": "merge", "r": 4, "tokens_per_block": [17, 13, 9]}}
    assert ready["plain"] == ""  # without --tokens the ready line is the bare tag, as before
    assert stats["merged"].pooled.runs == stats["plain"].pooled.runs == 2


def test_bad_token_settings_are_refused_before_any_process(pruned: dict) -> None:
    with pytest.raises(InvalidArgumentError, match=r"tokens=\{'r': 4\} is invalid; accepted: None for a 'onnx'"):
        Variant("onnx", "model.onnx", tokens={"r": 4})
    with pytest.raises(InvalidArgumentError, match=r"token_reduction=.* is invalid; accepted: a dict without the"):
        Variant("eager", pruned["state"], model=MODEL, tokens={"r": 4, "ratio": 0.5})
    with pytest.raises(InvalidArgumentError, match=r"method='swap' is invalid"):
        Variant("eager", pruned["state"], model=MODEL, tokens={"method": "swap"})
    with pytest.raises(InvalidArgumentError, match=r"tokens='merge' is invalid; accepted: None, a pqv_lightning"):
        load_eager_model(MODEL, pruned["state"], pruned["kwargs"], pruned["structure"], "merge")


def test_probe_command_line_carries_and_checks_tokens(pruned: dict, capsys: pytest.CaptureFixture) -> None:
    command = probe.serve_command("eager", pruned["state"], [1, 1, 16, 16], model=MODEL, tokens=SPEC.as_dict())
    assert json.loads(command[command.index("--tokens") + 1]) == SPEC.as_dict()
    assert "--tokens" not in probe.serve_command("eager", pruned["state"], [1, 1, 16, 16], model=MODEL)
    for argv, message in (
        (["serve", "onnx", "m.onnx", "--shape", "1,8", "--tokens", '{"r": 4}'], "--tokens applies to kind eager"),
        (["serve", "eager", pruned["state"], "--shape", "1,1,16,16", "--model", MODEL, "--tokens", "[4]"],
         "argument --tokens: invalid"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            probe.main(argv)
        assert message in capsys.readouterr().err
