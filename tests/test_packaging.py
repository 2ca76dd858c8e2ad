"""The installed package: one import namespace and a console entry point."""

import shutil
import subprocess
import sys


def test_one_import_namespace(tmp_path):
    code = (
        "import importlib.util, pqv_lightning.callbacks, pqv_lightning.datamodules\n"
        "assert importlib.util.find_spec('callbacks') is None, 'plain callbacks is importable'\n"
        "assert importlib.util.find_spec('datamodules') is None, 'plain datamodules is importable'\n"
        "from pqv_lightning.callbacks import StructuredPruning\n"
        "from pqv_lightning.datamodules import DigitsDataModule, HFImageDataModule\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_console_script_runs_the_cli(tmp_path):
    pqv = shutil.which("pqv") or str(__import__("pathlib").Path(sys.executable).with_name("pqv"))
    result = subprocess.run([pqv, "fit", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout and "--data" in result.stdout
