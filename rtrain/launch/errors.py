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
    from rtrain.checkpoint import open_checkpoints

    root = recipe.checkpoint_dir
    try:
        saved = open_checkpoints(root).list() if "://" in str(root) or Path(root).is_dir() else []
    except Exception as exc:  # noqa: BLE001 - an object store that does not answer: say so, do not fail here
        return f"the checkpoints in {root} could not be listed ({type(exc).__name__}); rerun the same command to " \
            "resume from the newest verified one"
    if not saved:
        return "no checkpoint was saved yet"
    return f"rerun the same command to resume from the newest verified checkpoint ({saved[0]})"


def stalled_run_error(run_dir: Path, resume_hint: str) -> RunStalled | None:
    """The run's one line when the stall watchdog ended it (its note in the run directory), else None."""
    note = read_stall_note(run_dir)
    return RunStalled(f"{note}; {resume_hint}") if note else None
