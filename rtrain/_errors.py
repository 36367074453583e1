"""The mark of an expected failure: a bad recipe, missing or damaged data, a damaged checkpoint, an unreachable
tracking server, a diverged run. Its message alone tells the user what to fix, so launchers print that one
line and no traceback (unless asked for one with `--debug`); anything else is a bug and keeps its traceback.
Imports nothing of rtrain but the redaction of rtrain.config (itself importing nothing), so every layer can
mark its errors."""

from __future__ import annotations

DEBUG_ENV = "RTRAIN_DEBUG"


class ExpectedError(Exception):
    """Mixed into the error classes whose message is enough (see the module docstring)."""


def one_line(exc: BaseException) -> str:
    """`Type: first meaningful line of the message` (whitespace collapsed; credentials in URLs redacted)."""
    from rtrain.config.redact import redact_url

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return redact_url(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def error_lines(text: str) -> str:
    """An expected failure as the CLIs print it: one `rtrain: ...` line per problem (blank lines dropped,
    indentation trimmed, a leading `rtrain: ` not doubled)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "\n".join(line if line.startswith("rtrain: ") else f"rtrain: {line}" for line in lines)
