"""The installed package is enough: recipes found by name, listed and copied out, and the quickstart run from a
wheel installed into a fresh virtual environment outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from pqv_lightning import recipes

REPO = Path(__file__).resolve().parents[1]
REPO_RECIPES = sorted(p.stem for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".yml"))


def test_every_yaml_in_configs_is_a_recipe():
    assert sorted(recipes.list_recipes()) == REPO_RECIPES
    assert {"quickstart", "sweep_digits"} <= set(REPO_RECIPES)


def test_a_name_finds_the_packaged_recipe_and_a_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = recipes.recipes_folder() / "quickstart.yaml"
    for value in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml"):
        assert recipes.find_recipe(value) == packaged, value
    (tmp_path / "quickstart.yaml").write_text("seed_everything: 1\n")
    assert recipes.find_recipe("quickstart") == Path("quickstart.yaml")
    assert recipes.find_recipe("quickstart.yaml") == Path("quickstart.yaml")
    assert recipes.find_recipe("configs/quickstart.yaml") == packaged
    for value in ("quickstrat", "elsewhere/quickstart.yaml", "configs/quickstart", "/no/such/quickstart.yaml", ""):
        with pytest.raises(ValueError, match=r"is invalid; accepted: a YAML file or a recipe name: .*quickstart"):
            recipes.find_recipe(value)


def test_config_arguments_are_rewritten_only_for_names(tmp_path, monkeypatch):
    from pqv_lightning.cli import resolve_config_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    packaged = str(recipes.recipes_folder() / "quickstart.yaml")
    inline = "trainer: {max_epochs: 1}"
    args = ["fit", "--config", "quickstart", "-c", "mine.yaml", "--config=quickstart", "--config", inline]
    assert resolve_config_args(args) == [
        "fit", "--config", packaged, "-c", "mine.yaml", f"--config={packaged}", "--config", inline,
    ]  # fmt: skip
    assert resolve_config_args(["fit", "--trainer.max_epochs=2"]) == ["fit", "--trainer.max_epochs=2"]


def test_cli_builds_the_packaged_recipe_by_name(tmp_path, monkeypatch, capsys):
    from pqv_lightning.callbacks import StructuredPruning
    from pqv_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["--config", "quickstart", "--trainer.max_epochs=2", "--trainer.logger=false"], run=False)
    assert cli.trainer.max_epochs == 2
    assert cli.model.hparams.model_name == "vit_tiny_patch16_224"
    pruning = [cb for cb in cli.trainer.callbacks if isinstance(cb, StructuredPruning)]
    assert len(pruning) == 1 and pruning[0].at_epoch == 33
    assert str(recipes.recipes_folder() / "quickstart.yaml") in capsys.readouterr().err


def test_unknown_recipe_name_ends_in_the_two_line_error(tmp_path, monkeypatch, capsys):
    from pqv_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quickstrat"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    names = ", ".join(REPO_RECIPES)
    assert lines == [
        f"pqv: error: config='quickstrat' is invalid; accepted: a YAML file or a recipe name: {names}.",
        "(set PQV_TRACEBACK=1 to see the traceback)",
    ]


def test_recipes_list_show_and_copy(tmp_path, monkeypatch, capsys):
    from pqv_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["recipes", "list"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in listed[: len(REPO_RECIPES)]}
    assert sorted(rows) == REPO_RECIPES
    assert "pqv-sweep" in rows["sweep_digits"] and "pqv fit" in rows["quickstart"]

    packaged = recipes.recipes_folder() / "quickstart.yaml"
    assert recipes.main(["show", "quickstart"]) == 0
    assert capsys.readouterr().out == packaged.read_text()

    assert recipes.main(["copy", "quickstart"]) == 0
    assert (tmp_path / "quickstart.yaml").read_text() == packaged.read_text()
    assert "pqv fit --config quickstart.yaml" in capsys.readouterr().out
    assert recipes.main(["copy", "quickstart"]) == 2  # an edited copy is never overwritten silently
    assert "--force" in capsys.readouterr().err
    (tmp_path / "quickstart.yaml").write_text("edited\n")
    assert recipes.main(["copy", "quickstart", "--force"]) == 0
    assert (tmp_path / "quickstart.yaml").read_text() == packaged.read_text()
    assert recipes.main(["copy", "quickstart", "mine/short.yaml"]) == 0
    assert (tmp_path / "mine" / "short.yaml").read_text() == packaged.read_text()
    assert recipes.main(["copy", "sweep_digits", "sweeps"]) == 0
    assert "pqv-sweep --config sweeps/sweep_digits.yaml" in capsys.readouterr().out
    assert recipes.main(["copy", "quickstrat"]) == 2
    assert "recipe='quickstrat' is invalid" in capsys.readouterr().err


def test_sweep_takes_a_packaged_recipe_by_name_and_finds_its_base(tmp_path, monkeypatch, capsys):
    from pqv_lightning.apps.sweep import main, sweep_recipe
    from pqv_lightning.apps.sweep_spec import load_spec

    monkeypatch.chdir(tmp_path)
    quickstart = recipes.recipes_folder() / "quickstart.yaml"
    config, base = sweep_recipe("sweep_digits")
    assert config == recipes.recipes_folder() / "sweep_digits.yaml"
    assert Path(base).resolve() == quickstart.resolve()
    assert main(["--config", "sweep_digits", "--list"]) == 0
    assert "r0.25_taylor" in capsys.readouterr().out
    # copied out of the package, it still names configs/quickstart.yaml: the packaged one unless such a file exists
    recipes.copy_recipe("sweep_digits", tmp_path)
    config, base = sweep_recipe("sweep_digits.yaml")
    assert Path(load_spec(config, {"base": base}).base).resolve() == quickstart.resolve()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text(quickstart.read_text())
    assert sweep_recipe("sweep_digits")[1] == "configs/quickstart.yaml"
    with pytest.raises(SystemExit):
        main(["--config", "sweep_digitz", "--list"])
    assert "--config='sweep_digitz' is invalid; accepted: a YAML file or a recipe name:" in capsys.readouterr().err


# --------------------------------------------------------------------------- the wheel, outside the checkout

_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "site", "runs", "lightning_logs", "artifacts", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache", "*.ckpt",
)  # fmt: skip


def _run(args: list, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    environ.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PIP_NO_INDEX": "1", **env})
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=environ, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _short_callbacks(quickstart_text: str) -> list[dict]:
    """The quickstart's own callbacks, each kept, with the numbers cut: pruning at epoch 1, two calibration
    batches, one quantization target, TorchScript only, a report of a few timed calls."""
    short = {
        "StructuredPruning": {"at_epoch": 1, "calibration_batches": 2},
        "Quantization": {"targets": ["int8_dynamic:x86"], "calibration_batches": 2, "eval_batches": 2},
        "MobileExport": {"artifacts": {"torchscript": ["fp32", "quantized"]}, "val_batches": 2},
        "TradeoffReport": {"warmup": 1, "runs": 3, "batch": None, "memory": False, "val_batches": 2},
    }
    callbacks = yaml.safe_load(quickstart_text)["trainer"]["callbacks"]
    for callback in callbacks:
        name = callback["class_path"].rpartition(".")[2]
        callback.setdefault("init_args", {}).update(short.get(name, {}))
    assert {cb["class_path"].rpartition(".")[2] for cb in callbacks} >= set(short), "the quickstart changed"
    return callbacks


@pytest.mark.slow
def test_quickstart_runs_from_a_wheel_installed_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1", reason="builds the wheel offline (bdist_wheel built in)")
    source, wheels, venv, work = (tmp_path / name for name in ("source", "wheels", "venv", "work"))
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], tmp_path)
    (wheel,) = wheels.glob("pqv_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        (metadata,) = [f for f in files if f.endswith(".dist-info/METADATA")]
        extras = {line.split(":")[1].strip() for line in archive.read(metadata).decode().splitlines()
                  if line.startswith("Provides-Extra:")}  # fmt: skip
    assert {"dev", "docs", "benchmarks"} <= extras, extras
    assert sorted(Path(f).stem for f in files if f.startswith("pqv_lightning/configs/")) == REPO_RECIPES, files
    assert not [f for f in files if f.startswith(("callbacks/", "datamodules/", "configs/"))]

    # A fresh environment that sees this one's installed dependencies (nothing is downloaded), not the checkout.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_pqv_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)
    work.mkdir()
    code = "import pqv_lightning as p, pqv_lightning.callbacks as c; print(p.__file__, c.__file__)"
    where = _run([python, "-c", code], work).stdout.split()
    assert all(Path(path).resolve().is_relative_to(venv.resolve()) for path in where), where

    pqv = venv / "bin" / "pqv"
    listed = _run([pqv, "recipes", "list"], work).stdout.splitlines()
    assert sorted(line.split()[0] for line in listed[: len(REPO_RECIPES)]) == REPO_RECIPES
    folder = listed[-1].split(" recipes in ")[1].partition(";")[0]
    assert Path(folder).resolve() == Path(site).resolve() / "pqv_lightning" / "configs", listed[-1]
    quickstart = (Path(folder) / "quickstart.yaml").read_text()
    short = work / "short.yaml"
    callbacks = _short_callbacks(quickstart)
    short.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    run = _run(
        [pqv, "fit", "--config", "quickstart", "--config", short, "--trainer.max_epochs=2",
         "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
         "--model.init_args.restart_epochs=[1]"],
        work, timeout=600,
    )  # fmt: skip
    assert f"pqv: --config quickstart: {folder}/quickstart.yaml (packaged;" in run.stderr
    assert "StructuredPruning: ratio 0.25" in run.stdout + run.stderr  # pruned at epoch 1, in the installed code
    out = work / "runs" / "quickstart" / "version_0"
    manifest = json.loads((out / "artifacts" / "manifest.json").read_text())
    verified = [a for a in manifest["artifacts"] if a["status"] == "ok"]
    assert {a["format"] for a in verified} == {"torchscript"} and len(verified) >= 2, manifest["artifacts"]
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.json").is_file()
    assert list((out / "checkpoints").glob("*.ckpt"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["init_args"]["model_name"] == "vit_tiny_patch16_224"
    assert len(config["trainer"]["callbacks"]) == len(callbacks)  # the later config's list replaced the recipe's
    pruning = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("StructuredPruning")]
    assert pruning[0]["init_args"]["at_epoch"] == 1
