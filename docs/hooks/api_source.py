"""MkDocs hooks for the API reference (mkdocstrings reads the sources; nothing is imported).

* ``on_config``: the repository keeps ``callbacks/`` and ``datamodules/`` beside ``pqv_lightning/`` and installs them
  as ``pqv_lightning.callbacks`` and ``pqv_lightning.datamodules`` (``pyproject.toml``'s ``package-dir``).
  mkdocstrings' loader (griffe) reads a package from one folder, so before the build this links the three folders
  into ``build/api-source/pqv_lightning`` (the wheel's layout), which ``mkdocs.yml`` gives mkdocstrings as its
  search path.
* ``on_page_content``: the docstrings cross-reference in Sphinx's roles (``:func:`load_artifact```); mkdocstrings
  renders Markdown, so the role names are dropped and ``~`` targets shortened to their last name, leaving the code.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / "build" / "api-source"
#: Package -> source folder, as in pyproject.toml's [tool.setuptools.package-dir].
SUBPACKAGES = {"callbacks": "callbacks", "datamodules": "datamodules"}
_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj):<code>(~?)\.?([^<]*)</code>")


@event_priority(100)  # before mkdocstrings reads its search paths
def on_config(config: Any) -> Any:
    """Rebuild ``build/api-source/pqv_lightning`` as links to the sources (every build: files come and go)."""
    package = TREE / "pqv_lightning"
    if TREE.exists():
        shutil.rmtree(TREE)
    package.mkdir(parents=True)
    for entry in (REPO / "pqv_lightning").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for name, folder in SUBPACKAGES.items():
        (package / name).symlink_to(REPO / folder, target_is_directory=True)
    return config


def _code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rpartition('.')[2] if short else target}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    """``:func:`name``` as rendered (the role's text and then the code) -> just the code."""
    return _ROLE.sub(_code, html)
