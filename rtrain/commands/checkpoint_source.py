"""A checkpoint named on the command line -> the verified checkpoint, its recipe and its rebuilt model.

CHECKPOINT_OR_RUN is one of:
- a `step-N/` folder written by rtrain.checkpoint: that checkpoint, verified (a damaged one is an error);
- a run directory (`<run.output_root>/<run.name>`): its checkpoint folder (from its `resolved_recipe.yaml`,
  so `checkpoint.dir` is honoured, else `<run>/checkpoints`), then the newest checkpoint that verifies
  (CheckpointManager.latest: damaged newer ones are skipped with a warning);
- a checkpoint folder holding `step-N/` folders: the newest one that verifies;
- either as an object-store URL (s3://bucket/run/checkpoints[/step-N]), read with rtrain.checkpoint.remote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rtrain._errors import ExpectedError
from rtrain.checkpoint import CheckpointError, CheckpointManager, Loaded, open_checkpoints
from rtrain.checkpoint.files import MANIFEST_NAME, STEP_DIR_PATTERN
from rtrain.config import Recipe, RecipeError, load_recipe, loads_recipe
from rtrain.models import model_from_config
from rtrain.models.weights import strip_wrapper_prefixes

RESOLVED_RECIPE_NAME = "resolved_recipe.yaml"  # written into every run directory by rtrain.launch


class CommandError(ExpectedError, RuntimeError):
    """An expected failure of a subcommand; its message is the one line the user sees."""


@dataclass
class CheckpointModel:
    loaded: Loaded
    recipe: Recipe
    model: nn.Module


def _checkpoint_folder(run: Path) -> Path:
    recipe_file = run / RESOLVED_RECIPE_NAME
    if recipe_file.is_file():
        try:
            return load_recipe(recipe_file).checkpoint_dir
        except RecipeError as exc:
            raise CommandError(f"{recipe_file}: {exc}") from None
    return run / "checkpoints"


def resolve_checkpoint(path: str | Path) -> Loaded:
    """The verified checkpoint that `path` names (see the module docstring); shared states only."""
    if "://" in str(path):  # in an object store: a step-N/ URL, or the checkpoint folder's URL
        return _resolve_remote(str(path).rstrip("/"))
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CommandError(f"{path}: not a directory (give a step-N/ checkpoint folder or a run directory)")
    if (path / MANIFEST_NAME).is_file() or STEP_DIR_PATTERN.fullmatch(path.name):
        return CheckpointManager(path.parent).load(path, shared_only=True)
    folder = path if CheckpointManager(path).list() else _checkpoint_folder(path)
    if "://" in str(folder):  # the run's recipe put its checkpoints in an object store
        return _resolve_remote(str(folder))
    if not folder.is_dir() or not CheckpointManager(folder).list():
        raise CommandError(f"{path}: not a checkpoint (step-N/) and no checkpoints under {folder}")
    loaded = CheckpointManager(folder).latest(shared_only=True)
    if loaded is None:
        raise CommandError(f"{folder}: no checkpoint passes verification")
    return loaded


def _resolve_remote(url: str) -> Loaded:
    try:
        if STEP_DIR_PATTERN.fullmatch(url.rsplit("/", 1)[-1]):
            return open_checkpoints(url.rsplit("/", 1)[0]).load(url, shared_only=True)
        checkpoints = open_checkpoints(url)
        if not checkpoints.list():
            raise CommandError(f"{url}: no checkpoints (step-N/ with a MANIFEST.json) there")
        loaded = checkpoints.latest(shared_only=True)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None
    except CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store's own errors: one line naming the URL
        raise CommandError(f"{url}: cannot read it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") \
            from None
    if loaded is None:
        raise CommandError(f"{url}: no checkpoint passes verification")
    return loaded


def recipe_of(loaded: Loaded) -> Recipe:
    text = loaded.meta.get("recipe_yaml")
    if not isinstance(text, str):
        raise CommandError(f"{loaded.path}: meta.json holds no recipe_yaml (not written by rtrain.launch?)")
    return loads_recipe(text, where=f"{loaded.path}: stored recipe")


def model_state_of(loaded: Loaded) -> dict:
    state = loaded.shared.get("model")
    if not isinstance(state, dict):
        raise CommandError(f"{loaded.path}: no model state in the checkpoint (it holds {sorted(loaded.shared)})")
    return strip_wrapper_prefixes(state)


def load_checkpoint_model(path: str | Path) -> CheckpointModel:
    """The checkpoint's model, rebuilt from its stored recipe (as rtrain.launch.worker builds it, without
    `init_from`: the checkpoint has the weights) and loaded strictly, in eval mode on the CPU."""
    loaded = resolve_checkpoint(path)
    recipe = recipe_of(loaded)
    state = model_state_of(loaded)
    head = state.get("fc.weight")
    num_classes = recipe.model.num_classes or (int(head.shape[0]) if head is not None else None)
    if num_classes is None:
        raise CommandError(f"{loaded.path}: cannot tell the number of classes (no fc.weight, no model.num_classes)")
    model_cfg = recipe.model.model_copy(update={"init_from": None, "checkpoint_stages": False})
    model = model_from_config(model_cfg, num_classes, recipe.run.seed)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CommandError(f"{loaded.path}: the model state does not fit {recipe.model.name}: "
                           f"{' '.join(line.strip() for line in first[:3])}") from None
    return CheckpointModel(loaded, recipe, model.eval())
