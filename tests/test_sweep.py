"""``pqv-sweep``: the grid, its validation before any training, the combined table and plots, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import pqv_lightning.apps.sweep as sweep
from pqv_lightning.apps.sweep import SWEEP_PLOTS, grid, load_spec, main, run_sweep

TINY_RECIPE = {
    "model": {
        "class_path": "pqv_lightning.ViTClassifier",
        "init_args": {
            "model_name": "vit_tiny_patch16_224",
            "num_classes": 10,
            "model_kwargs": {
                "img_size": 16,
                "patch_size": 4,
                "in_chans": 1,
                "depth": 2,
                "embed_dim": 64,
                "num_heads": 2,
                "global_pool": "avg",
            },
            "lr": 3.0e-3,
            "warmup_epochs": 0,
        },
    },
    "data": {
        "class_path": "pqv_lightning.datamodules.DigitsDataModule",
        "init_args": {"img_size": 16, "in_chans": 1, "batch_size": 128},
    },
}


def _config(tmp_path: Path, **changes) -> Path:
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump(TINY_RECIPE))
    doc = {
        "base": str(base),
        "output_dir": str(tmp_path / "out"),
        "dense_epochs": 1,
        "finetune_epochs": 1,
        "ratios": [0.0, 0.5],
        "importances": ["l2"],
        "distillation": None,
        "quantization": ["int8_dynamic:x86"],
        "export": {"formats": ["torchscript", "onnx"], "onnx_precisions": ["fp32", "int8"]},
        "report": {"threads": 1, "warmup": 1, "runs": 3, "batch": 4, "memory": False},
        "calibration_batches": 1,
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_grid_has_one_unpruned_point_and_every_ratio_criterion_pair(tmp_path):
    spec = load_spec(_config(tmp_path, ratios=[0.0, 0.25, 0.5], importances=["l1", "taylor"]))
    assert [p[0] for p in grid(spec)] == ["dense", "r0.25_l1", "r0.25_taylor", "r0.5_l1", "r0.5_taylor"]
    spec = load_spec(_config(tmp_path, ratios=[0.0], latency_targets_ms=[1.5], latency={"target": "eager"}))
    assert grid(spec) == [("dense", 0.0, None), ("t1.5ms_l2", None, "l2")]
    assert spec.latency_target("t1.5ms_l2").artifact == "eager" and spec.latency_target("dense") is None


def test_the_tokens_axis_repeats_every_point_at_each_r(tmp_path):
    spec = load_spec(_config(tmp_path, ratios=[0.0, 0.25], importances=["l2"], tokens=[0, 8]))
    assert [p[0] for p in grid(spec)] == ["dense", "r0.25_l2", "dense_tome8", "r0.25_l2_tome8"]
    assert spec.token_reduction("r0.25_l2_tome8").as_dict()["r"] == 8 and spec.token_reduction("r0.25_l2") is None
    spec = load_spec(_config(tmp_path, ratios=[0.0], tokens=[4], token_method="prune"))
    assert [p[0] for p in grid(spec)] == ["dense_evit4"] and spec.token_reduction("dense_evit4").method == "prune"
    for tokens, message in (([], r"tokens=\[\] is invalid"), ([-1], r"tokens\[0\]=-1 is invalid"),
                            ([4, 4], "each r once")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_spec(_config(tmp_path, tokens=tokens))
    with pytest.raises(ValueError, match="token_method='drop' is invalid; accepted: merge, prune"):
        load_spec(_config(tmp_path, token_method="drop"))


@pytest.mark.slow
def test_a_latency_point_searches_its_ratio_on_the_dense_model_and_caches_the_trials(tmp_path, monkeypatch):
    import pqv_lightning.latency_search as ls

    measured: list[float] = []
    monkeypatch.setattr(ls, "measure_pruned_latency", lambda *a, **k: measured.append(a[2]) or 10.0 - 9.6 * a[2])
    config = _config(tmp_path, ratios=[0.0], latency_targets_ms=[5.0], latency={"target": "onnx-int8", "threads": 1},
                     export={"formats": ["onnx"], "onnx_precisions": ["int8"]})  # fmt: skip
    assert main(["--config", str(config), "--no-progress", "--point", "t5ms_l2"]) == 0
    out = tmp_path / "out"
    result = json.loads((out / "points" / "t5ms_l2" / "result.json").read_text())
    search = result["latency_search"]
    assert search["latency_ms"] <= 5.0 and result["ratio"] == search["ratio"] > 0.5
    assert result["pruning"]["macs_after"] < result["pruning"]["macs_before"]
    cache = json.loads((out / "latency_trials.json").read_text())["onnx-int8@1"]
    assert len(cache) == len(measured) == 8
    measured.clear()
    (out / "points" / "t5ms_l2" / "result.json").unlink()  # run the point again: every ratio is cached
    assert main(["--config", str(config), "--no-progress", "--point", "t5ms_l2"]) == 0
    assert measured == []


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"ratios": [0.0, 1.0]}, r"ratios\[1\]=1.0 is invalid; accepted: a number in \[0, 1\)"),
        ({"ratios": []}, r"ratios=\[\] is invalid"),
        ({"importances": ["l3"]}, r"l3"),
        ({"importances": []}, r"importances=\[\] is invalid"),
        ({"quantization": ["int9:x86"]}, r"int9"),
        ({"export": {"formats": ["tflite"]}}, r"formats\[0\]='tflite' is invalid; accepted: torchscript"),
        ({"report": {"threads": 0}}, r"threads=0 is invalid"),
        ({"report": {"colour": "red"}}, r"report\['colour'\]='red' is invalid; accepted: keys among threads"),
        ({"distillation": {"temperature": -1.0}}, r"temperature"),
        ({"dense_epochs": 0}, r"dense_epochs=0 is invalid; accepted: an int >= 1"),
        (
            {"base": "/nonexistent/recipe.yaml"},
            r"base='/nonexistent/recipe.yaml' is invalid; accepted: the path of an existing",
        ),
        ({"epochs": 3}, r"epochs=3 is invalid; accepted: a key of sweep config .*: base"),
        ({"latency_targets_ms": [0]}, r"latency_targets_ms\[0\]=0 is invalid; accepted: a positive number of ms"),
        ({"latency_targets_ms": [2.0], "latency": {"target": "tflite"}}, r"latency_target='tflite' is invalid"),
        ({"latency_targets_ms": [2.0], "latency": {"cores": 2}}, r"latency\['cores'\]=2 is invalid"),
        ({"ratios": [0.0], "latency_targets_ms": [2.0], "importances": []}, r"latency targets need a criterion"),
    ],
)
def test_bad_specs_are_refused_before_anything_trains(tmp_path, changes, match, monkeypatch):
    monkeypatch.setattr(sweep, "_dense_weights", pytest.fail)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_spec(_config(tmp_path, **changes))


def test_cli_reports_a_bad_spec_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(_config(tmp_path, ratios=[2.0])), "--no-progress"])
    assert exc.value.code == 2 and "ratios[0]=2.0 is invalid" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_table_and_plots_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    config = _config(tmp_path)
    spec = load_spec(config)
    out = Path(spec.output_dir)
    real_run_point = sweep._run_point
    calls: list[str] = []

    def interrupted(spec, recipe, dense, point, out, bar):
        calls.append(point[0])
        if point[0] == "r0.5_l2":
            raise KeyboardInterrupt  # the sweep is stopped during its second point
        return real_run_point(spec, recipe, dense, point, out, bar)

    monkeypatch.setattr(sweep, "_run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, progress=False)
    assert calls == ["dense", "r0.5_l2"]
    assert (out / "points" / "dense" / "result.json").is_file() and (out / "dense.pt").is_file()
    assert not (out / "points" / "r0.5_l2" / "result.json").exists()

    calls.clear()
    monkeypatch.setattr(sweep, "_run_point", lambda *a: calls.append(a[3][0]) or real_run_point(*a))
    monkeypatch.setattr(sweep, "_dense_weights", lambda spec, recipe, out, bar: __import__("torch").load(
        out / "dense.pt", weights_only=True))  # fmt: skip
    assert main(["--config", str(config), "--no-progress"]) == 0
    assert calls == ["r0.5_l2"]  # the finished point is not run again

    doc = json.loads((out / "sweep.json").read_text())
    points = {p["id"]: p for p in doc["points"]}
    assert set(points) == {"dense", "r0.5_l2"} and doc["plot_errors"] == {}
    dense, pruned = (next(v for v in points[k]["variants"] if v["name"] == "float fp32 eager" or
                          v["name"] == "pruned fp32 eager") for k in ("dense", "r0.5_l2"))  # fmt: skip
    assert pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    assert points["r0.5_l2"]["pruning"]["params_after"] == pruned["params"]
    for point in points.values():
        names = {v["name"] for v in point["variants"] if v.get("latency")}
        assert {"int8_dynamic_x86 eager", "torchscript-fp32", "onnx-fp32", "onnx-int8"} <= names
    text = (out / "sweep.md").read_text()
    assert "| dense | 0 | - |" in text and "| r0.5_l2 | 50 | l2 |" in text
    for name in SWEEP_PLOTS:
        assert (out / f"{name}.png").stat().st_size > 10_000

    with pytest.raises(ValueError, match="another spec"):
        run_sweep(load_spec(_config(tmp_path, finetune_epochs=2)), progress=False)


def test_list_prints_every_point_with_its_index(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "_dense_weights", pytest.fail)  # listing trains nothing
    config = _config(tmp_path, ratios=[0.0, 0.25, 0.5], importances=["l1", "taylor"])
    assert main(["--config", str(config), "--list"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines == ["0", "dense", "1", "r0.25_l1", "2", "r0.25_taylor", "3", "r0.5_l1", "4", "r0.5_taylor"]


def test_an_unknown_point_is_a_usage_error_naming_the_points(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(_config(tmp_path)), "--point", "r0.3_l2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--point='r0.3_l2' is invalid" in err and "0=dense, 1=r0.5_l2" in err


def test_fresh_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "_dense_weights", pytest.fail)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["--config", str(_config(tmp_path)), "--fresh", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "sweep_spec.json" in err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_points_run_as_separate_jobs_then_merge(tmp_path, capsys):
    config = str(_config(tmp_path))
    out = tmp_path / "out"
    assert main(["--config", config, "--prepare", "--no-progress"]) == 0
    assert (out / "dense.pt").is_file() and (out / "sweep_spec.json").is_file()
    assert main(["--config", config, "--point", "1", "--no-progress"]) == 0  # by index: r0.5_l2
    assert main(["--config", config, "--merge"]) == 1  # the dense point has not run
    assert "1 of 2 points not finished: dense" in capsys.readouterr().err
    assert main(["--config", config, "--point", "dense", "--no-progress"]) == 0  # by id
    assert main(["--config", config, "--merge"]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert {p["id"] for p in doc["points"]} == {"dense", "r0.5_l2"} and doc["plot_errors"] == {}
    assert "| r0.5_l2 | 50 | l2 |" in (out / "sweep.md").read_text()
    # a changed spec is refused by every mode, not mixed into the folder
    changed = str(_config(tmp_path, finetune_epochs=2))
    for mode in (["--point", "dense"], ["--merge"]):
        assert main(["--config", changed, *mode, "--no-progress"]) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"PK\x03\x04 truncated", "truncated"), ({"note": "not a tensor"}, "is not a state dict of tensors")],
)
def test_a_damaged_dense_cache_is_named_with_what_to_do(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setattr(sweep, "quiet_trainer", pytest.fail)  # nothing trains on a damaged cache
    config = str(_config(tmp_path))
    out = tmp_path / "out"
    assert main(["--config", config, "--list"]) == 0
    out.mkdir(exist_ok=True)
    cache = out / "dense.pt"
    if isinstance(content, bytes):
        cache.write_bytes(content)
    else:
        import torch

        torch.save(content, cache)
    capsys.readouterr()
    assert main(["--config", config, "--prepare", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(cache) in err and message in err and "elete it to retrain" in err and "Traceback" not in err, err
