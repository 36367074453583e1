"""The recipes that ship inside the package (rtrain/recipes/*.yaml, also `recipes/` in a checkout), by name.

A recipe argument is a path when that file exists, else the name of a packaged recipe (`quickstart`,
`degradation/resnet20`, with or without `.yaml`). Names are looked up in the listing, never joined onto a
folder, so a name cannot reach outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class NamedRecipe:
    name: str  # quickstart, degradation/resnet20
    path: Path
    purpose: str  # the file's first comment line


def _purpose(path: Path) -> str:
    """The recipe's first comment line: by convention one sentence saying what it trains and where."""
    for line in path.read_text(errors="replace").splitlines()[:1]:
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def packaged_recipes(root: Path = RECIPES_DIR) -> list[NamedRecipe]:
    if not root.is_dir():
        return []
    paths = sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), str(p)))
    return [NamedRecipe(p.relative_to(root).with_suffix("").as_posix(), p, _purpose(p)) for p in paths]


def find_recipe(name: str, root: Path = RECIPES_DIR) -> Path | None:
    """The packaged recipe called `name` (`.yaml` optional), else None."""
    wanted = name.removesuffix(".yaml").removesuffix(".yml")
    for recipe in packaged_recipes(root):
        if recipe.name == wanted:
            return recipe.path
    return None


def recipe_path(arg: str | Path) -> Path:
    """`arg` as given when it names an existing file, else the packaged recipe of that name, else `arg` (so the
    reader's error names what was asked for)."""
    path = Path(arg)
    if path.exists():
        return path
    return find_recipe(str(arg)) or path
