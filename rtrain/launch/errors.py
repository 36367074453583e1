"""The launch layer's failure kinds, below both the launchers and the worker so that each imports them
downward: LaunchError, and which failures print as one line without a traceback (EXPECTED_ERRORS)."""

from __future__ import annotations

from rtrain._errors import ExpectedError
from rtrain.config import RecipeError

# Failures whose message is enough (rtrain._errors); RecipeError too, which rtrain.config (importing nothing
# of rtrain) cannot mark itself.
EXPECTED_ERRORS = (ExpectedError, RecipeError)


class LaunchError(ExpectedError, RuntimeError):
    """The run could not be started or a worker failed; the message names the rank or the service."""
