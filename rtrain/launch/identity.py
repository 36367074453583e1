"""Checkpoints know whose they are: before a launch writes anything into the run directory, the checkpoint it
would resume is compared with the recipe on the run-identity keys (rtrain.config.sections.IDENTITY_KEYS: the
model, the optimizer's state layout, the data and its order). A difference is refused in one line listing the
keys, old and new values, unless `checkpoint.allow_changes` names them (a deliberate change, e.g. fine-tuning
on a new source). Only the checkpoint's meta.json is read (a few KB): no state is loaded, nothing written.

The checkpoint's recipe is the resolved recipe it was saved with (meta.json `recipe_yaml`, credentials
redacted); it is read through today's schema so that keys added since then compare with their defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rtrain.config import Recipe, RecipeError, recipe_from_dict
from rtrain.config.redact import drop_redacted, redact_url
from rtrain.config.sections import IDENTITY_KEYS
from rtrain._remote import ObjectPath, is_url


def _value(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return redact_url(node) if key == "data.source" and isinstance(node, str) else node


_MISSING = object()


MAX_RECIPE_CHARS = 1 << 20  # a resolved recipe is a few KB


class _NoAliases(yaml.SafeLoader):
    """A recipe has no anchors or aliases; a checkpoint's text that uses them (a billion laughs) is refused."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed in a recipe")
        return super().compose_node(parent, index)


def _identity(recipe_yaml: str) -> dict[str, Any]:
    """The identity of a saved recipe; keys it cannot tell are left out (not compared). The text comes from a
    checkpoint (anyone who could write there wrote it): bounded in size, no aliases, any failure = unknown."""
    if len(recipe_yaml) > MAX_RECIPE_CHARS:
        return {}
    try:
        raw = yaml.load(recipe_yaml, Loader=_NoAliases)  # noqa: S506 - a SafeLoader without aliases
    except (yaml.YAMLError, ValueError, TypeError, RecursionError, OverflowError):
        return {}
    if not isinstance(raw, dict):
        return {}
    try:  # today's schema fills in keys added since (their defaults)
        raw = recipe_from_dict(drop_redacted(raw), where="checkpoint recipe").model_dump(mode="json")
    except (RecipeError, ValueError, TypeError, RecursionError):
        pass  # written by another rtrain whose schema differed: compare what it says
    found = {key: _value(raw, key) for key in IDENTITY_KEYS}
    return {key: value for key, value in found.items() if value is not _MISSING}


def _checkpoint_to_resume(recipe: Recipe) -> Path | None:
    from rtrain.checkpoint import open_checkpoints

    choice = recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice != "auto":  # a bucket URL stays one (Path() would fold `s3://` into a local `s3:/`)
        return ObjectPath(choice) if is_url(choice) else Path(choice)
    root = recipe.checkpoint_dir
    if "://" in str(root):
        try:
            saved = open_checkpoints(root).list()
        except Exception:  # noqa: BLE001 - unreachable now: the ranks' resume names the problem
            return None
    else:
        saved = open_checkpoints(root).list() if Path(root).is_dir() else []
    return saved[0] if saved else None


def _saved_recipe(path: Path) -> str | None:
    from rtrain.checkpoint import CheckpointError, files, open_checkpoints

    try:
        if "://" in str(path):  # the manifest and meta.json of a checkpoint in an object store
            try:
                meta = open_checkpoints(str(path).rsplit("/", 1)[0]).meta_of(path)
            except Exception:  # noqa: BLE001 - unreadable now: the ranks' verified resume names the problem
                return None
        else:
            meta = files.read_meta(path, files.read_manifest(path))
    except (CheckpointError, OSError, ValueError):
        return None  # damaged or absent: the ranks' verified resume deals with it (and names it)
    text = meta.get("recipe_yaml") if isinstance(meta, dict) else None
    return text if isinstance(text, str) else None


def check_resume_identity(recipe: Recipe) -> None:
    """RecipeError (one line) when the checkpoint this launch would resume belongs to another run identity."""
    path = _checkpoint_to_resume(recipe)
    saved = _saved_recipe(path) if path is not None else None
    if saved is None:
        return
    then = _identity(saved)
    now = _identity(recipe.to_yaml())
    allowed = set(recipe.checkpoint.allow_changes)
    differ = [key for key in IDENTITY_KEYS if key in then and key in now and then[key] != now[key]
              and key not in allowed]
    if not differ:
        return
    changes = ", ".join(f"{key} {then[key]!r} -> {now[key]!r}" for key in differ)
    raise RecipeError(
        f"checkpoint {path} belongs to another run identity ({changes}): resuming it would load another "
        f"model's or optimizer's state or data position; use the checkpoint's values, another run.name (or "
        f"checkpoint.resume=never), or checkpoint.allow_changes=[{','.join(differ)}] if the change is deliberate")
