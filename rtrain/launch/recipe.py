"""Recipe preparation before any worker starts: names checked, paths made absolute, the resolved recipe
written beside the run's outputs."""

from __future__ import annotations

import os
from pathlib import Path

from rtrain.config import Recipe, RecipeError, recipe_from_dict

RESOLVED_RECIPE_NAME = "resolved_recipe.yaml"


def check_model_name(recipe: Recipe) -> None:
    from rtrain.models import list_models

    known = list_models(include_generic=True)
    if recipe.model.name not in known:
        raise RecipeError(f"model.name={recipe.model.name!r}: not a registered model; "
                          f"known: {', '.join(known)} (`rtrain models` lists them)")


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:
        return path
    return str(path if Path(path).is_absolute() else base / path)


def pin_paths(recipe: Recipe, base: Path) -> Recipe:
    """A new recipe whose relative paths are absolute against `base`.

    Ray Train workers run in their own working directory, so paths must mean the same everywhere.
    """
    from rtrain.tracking import TrackingError, resolve_tracking_uri

    raw = recipe.model_dump(mode="json")
    raw["run"]["output_root"] = _absolute(raw["run"]["output_root"], base)
    raw["checkpoint"]["dir"] = _absolute(raw["checkpoint"]["dir"], base)
    raw["data"]["source"] = _absolute(raw["data"]["source"], base)
    raw["model"]["init_from"] = _absolute(raw["model"]["init_from"], base)
    uri = raw["tracking"]["uri"]
    if raw["tracking"]["enabled"] and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raw["tracking"]["uri"] = "sqlite:///" + str(base / uri[len("sqlite:///"):])
    pinned = recipe_from_dict(raw, where="recipe (paths made absolute)")
    if pinned.tracking.enabled:
        try:
            resolve_tracking_uri(pinned.tracking.uri, create=False)  # refuses the file store; makes nothing
        except TrackingError as exc:
            raise RecipeError(str(exc)) from None
    return pinned


def prepare_recipe(recipe: Recipe, base: Path | None = None) -> Recipe:
    check_model_name(recipe)
    return pin_paths(recipe, (base or Path.cwd()).resolve())


def write_resolved_recipe(recipe: Recipe) -> Path:
    """The run's record of its recipe (credentials redacted), readable by its owner only."""
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    path = recipe.run_dir / RESOLVED_RECIPE_NAME
    write_private(path, recipe.to_yaml())
    return path


def write_private(path: Path, text: str) -> None:
    """`text` into a file created 0600 (an existing one is made 0600 before it is rewritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
