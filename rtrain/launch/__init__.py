"""Entry points of a run and the composition root.

- entry.py    `python -m rtrain.launch` (also `rtrain launch`): validate, prepare, pick a launcher
- recipe.py   recipe preparation (model name, absolute paths, resolved recipe file)
- local.py    plain processes on this host; ray.py: Ray Train workers on a Ray cluster
- workers.py  which function each worker runs and its import path; errors.py: LaunchError, EXPECTED_ERRORS
- worker.py   run_worker: the one place that wires models, data, optim, dist, engine, checkpointing and
              tracking together
"""

from importlib import import_module
from typing import Any

# Imported when first used, not with the package: `python -m rtrain.launch` imports this package before its
# __main__, which installs the stop-signal handlers first and only then imports the launcher.
_EXPORTS = {"launch": "entry", "main": "entry", "LaunchError": "errors", "check_model_name": "recipe",
            "prepare_recipe": "recipe"}

__all__ = ["LaunchError", "check_model_name", "launch", "main", "prepare_recipe"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rtrain.launch' has no attribute {name!r}")
    return getattr(import_module(f"rtrain.launch.{_EXPORTS[name]}"), name)
