"""The launch layer's failure kinds, below both the launchers and the worker so that each imports them
downward: LaunchError, and which failures print as one line without a traceback (EXPECTED_ERRORS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rtrain._errors import ExpectedError
from rtrain._process import EXIT_STALLED, read_stall_note
from rtrain.config import RecipeError

# Failures whose message is enough (rtrain._errors); RecipeError too, which rtrain.config (importing nothing
# of rtrain) cannot mark itself.
EXPECTED_ERRORS = (ExpectedError, RecipeError)


class LaunchError(ExpectedError, RuntimeError):
    """The run could not be started or a worker failed; the message names the rank or the service."""

    exit_code = 1


class RunStalled(LaunchError):
    """The stall watchdog ended the run: a rank made no progress for dist.stall_timeout_s. Retryable."""

    exit_code = EXIT_STALLED


def resume_hint(recipe: Any) -> str:
    """What to do after a failure: the newest verified checkpoint to resume from, if there is one."""
    from rtrain.checkpoint import CheckpointManager

    saved = CheckpointManager(recipe.checkpoint_dir).list() if Path(recipe.checkpoint_dir).is_dir() else []
    if not saved:
        return "no checkpoint was saved yet"
    return f"rerun the same command to resume from the newest verified checkpoint ({saved[0]})"


def stalled_run_error(run_dir: Path, resume_hint: str) -> RunStalled | None:
    """The run's one line when the stall watchdog ended it (its note in the run directory), else None."""
    note = read_stall_note(run_dir)
    return RunStalled(f"{note}; {resume_hint}") if note else None
