"""Entry points of a run and the composition root.

- entry.py    `python -m rtrain.launch` (also `rtrain launch`): validate, prepare, pick a launcher
- recipe.py   recipe preparation (model name, absolute paths, resolved recipe file)
- local.py    plain processes on this host; ray.py: Ray Train workers on a Ray cluster
- workers.py  which function each worker runs and its import path; errors.py: LaunchError, EXPECTED_ERRORS
- worker.py   run_worker: the one place that wires models, data, optim, dist, engine, checkpointing and
              tracking together
"""

from rtrain.launch.entry import launch, main
from rtrain.launch.errors import LaunchError
from rtrain.launch.recipe import check_model_name, prepare_recipe

__all__ = ["LaunchError", "check_model_name", "launch", "main", "prepare_recipe"]
