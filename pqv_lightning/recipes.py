"""The training and sweep recipes (``configs/*.yaml``) shipped inside the package, found by name.

A user who installed the wheel instead of cloning the repository has no ``configs/`` folder; the package carries
it as ``pqv_lightning/configs`` (``pyproject.toml`` maps it to the repository's ``configs/``, so every YAML there
ships, with no list to keep). ``pqv fit --config quickstart`` and ``pqv-sweep --config sweep_digits`` take a
recipe by name; ``pqv recipes list | show NAME | copy NAME [DEST]`` lists them and copies one out to edit::

    pqv recipes copy quickstart            # ./quickstart.yaml, then: pqv fit --config quickstart.yaml

A value names a recipe only when no file of that name exists: a path always wins, so a copied and edited recipe is
used instead of the packaged one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pqv_lightning.utils.checks import invalid
from pqv_lightning.utils.io import atomic_write

__all__ = ["find_recipe", "list_recipes", "main", "recipe_summary", "recipes_folder", "resolve_reference", "runner"]

SUFFIXES = (".yaml", ".yml")
#: The folder the recipes are named after in the repository, in the README and inside other recipes.
FOLDER = "configs"


def recipes_folder() -> Path:
    """The packaged recipes: ``pqv_lightning/configs`` in an installed wheel, else the repository's ``configs/``
    beside the package (a source checkout or an editable install, whose import path is the repository)."""
    package = Path(__file__).resolve().parent
    for folder in (package / FOLDER, package.parent / FOLDER):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"no recipe folder: neither {package / FOLDER} (installed package) nor {package.parent / FOLDER} "
        "(source checkout) exists; reinstall pqv-lightning"
    )


def list_recipes() -> dict[str, Path]:
    """Every packaged recipe by name (the file name without ``.yaml``), sorted."""
    return {path.stem: path for path in sorted(recipes_folder().iterdir()) if path.suffix in SUFFIXES}


def _name_of(value: str | os.PathLike) -> str | None:
    """The recipe name ``value`` spells (``quickstart``, ``quickstart.yaml`` or ``configs/quickstart.yaml``),
    else ``None`` (any other path)."""
    path = Path(value)
    if not path.name or path.is_absolute() or len(path.parts) > 2:
        return None
    if len(path.parts) == 2 and path.parts[0] != FOLDER:
        return None
    if len(path.parts) == 2 and path.suffix not in SUFFIXES:
        return None
    return path.stem if path.suffix in SUFFIXES else path.name


def find_recipe(value: str | os.PathLike, name: str = "config") -> Path:
    """The YAML file ``value`` names: the file itself if it exists, else ``<value>.yaml`` in the working
    directory, else the packaged recipe of that name. ``configs/<name>.yaml`` (the repository's path, as the
    README and the sweep recipes write it) falls back to the packaged recipe too. Anything else is refused,
    listing the recipes (``name`` is the argument the message names)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    recipe = _name_of(value)
    if recipe is not None and not Path(value).suffix:
        for suffix in SUFFIXES:
            if path.with_name(path.name + suffix).is_file():
                return path.with_name(path.name + suffix)
    recipes = list_recipes()
    if recipe in recipes:
        return recipes[recipe]
    raise invalid(name, str(value), f"a YAML file or a recipe name: {', '.join(recipes)}")


def resolve_reference(value: str, recipe: str | os.PathLike, name: str) -> str:
    """A file that recipe ``recipe`` names (a sweep's ``base``), as written when it exists in the working
    directory, relative to the recipe folder's parent (the repository layout, also inside the package), else
    through :func:`find_recipe`; ``value`` unchanged when none of them is a file (its user reports it)."""
    path = Path(value)
    if path.is_absolute() or path.is_file():
        return value
    beside = Path(recipe).parent.parent / path
    if beside.is_file():
        return str(beside)
    try:
        return str(find_recipe(value, name))
    except ValueError:
        return value


def recipe_summary(path: Path, width: int = 100) -> str:
    """What a recipe runs: its leading comment up to the first colon or full stop, cut to ``width`` characters."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("python ", "pqv")):
            break
        words.append(text)
    summary = " ".join(words)
    ends = [end for end in (summary.find(": "), summary.find(". ")) if end >= 0]
    summary = summary[: min(ends)] if ends else summary.rstrip(".")
    return summary if len(summary) <= width else summary[: width - 1].rstrip() + "…"


def runner(path: Path) -> str:
    """The command that runs a recipe: ``pqv-sweep`` for a sweep (it names a ``base`` recipe), else ``pqv fit``."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return "pqv fit"
    return "pqv-sweep" if isinstance(doc, dict) and "base" in doc else "pqv fit"


def copy_recipe(recipe: str, dest: str | os.PathLike = ".", force: bool = False) -> Path:
    """Copy the packaged recipe ``recipe`` to ``dest`` (a folder, or a file name) to edit it; an existing file is
    kept unless ``force``. Returns the written path."""
    recipes = list_recipes()
    if recipe not in recipes:
        raise invalid("recipe", recipe, f"a recipe name: {', '.join(recipes)}")
    target = Path(dest).expanduser()
    if target.is_dir() or str(dest).endswith(("/", os.sep)) or target.suffix not in SUFFIXES:
        target = target / recipes[recipe].name
    if target.exists() and not force:
        raise invalid("dest", str(target), "a file that does not exist yet (or --force to overwrite it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(recipes[recipe], tmp))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``pqv recipes``: list the packaged recipes, print one, or copy one out to edit."""
    parser = argparse.ArgumentParser(
        prog="pqv recipes",
        description="The recipes shipped with pqv-lightning; pass one by name: pqv fit --config quickstart.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="name and summary of every recipe, and their folder")
    show = commands.add_parser("show", help="print a recipe (pqv recipes show quickstart > mine.yaml)")
    show.add_argument("name")
    copy = commands.add_parser("copy", help="copy a recipe to a folder or file, to edit it")
    copy.add_argument("name")
    copy.add_argument("dest", nargs="?", default=".", help="a folder or a .yaml file name (default: .)")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    try:
        recipes = list_recipes()
        if args.command == "list":
            width = max(map(len, recipes), default=0)
            for recipe, path in recipes.items():
                print(f"{recipe:<{width}}  {runner(path):<9}  {recipe_summary(path)}")
            print(f"\n{len(recipes)} recipes in {recipes_folder()}; run one by name: pqv fit --config NAME")
        elif args.command == "show":
            if args.name not in recipes:
                raise invalid("name", args.name, f"a recipe name: {', '.join(recipes)}")
            sys.stdout.write(recipes[args.name].read_text())
        else:
            target = copy_recipe(args.name, args.dest, args.force)
            print(f"wrote {target}; run it with: {runner(target)} --config {target}")
    except (ValueError, FileNotFoundError) as err:
        print(f"pqv recipes: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
