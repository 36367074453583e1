"""Secrets kept out of every record: what a resolved recipe, MLflow params and artifacts, checkpoint metadata,
logs and error lines show instead of a credential.

Redacted (`***`): every string value under `data.storage_options` (fsspec options: keys, tokens, endpoints
with credentials; booleans and numbers stay), the userinfo of any URL (`https://user:token@host/...` ->
`https://***@host/...`), secret-looking query parameters of a URL (`?token=...`), and the value of any key that
names a credential (password, token, secret, access key, ...) wherever it is. The run itself gets the real
values from the recipe in memory; a run started again from a record gets them from the environment (AWS_*,
MLFLOW_TRACKING_*) or from `key=value` overrides on the command line (drop_redacted).

Imports nothing of rtrain: every layer may redact what it writes.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"
SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|"
                        r"session[_-]?key|auth|signature|^sig$|^key$)", re.I)
SECRET_SECTIONS = (("data", "storage_options"),)
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^/@\s]+)@", re.I)


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def redact_url(text: str) -> str:
    """`text` with the userinfo of every URL in it, and secret-looking query values, replaced by ***."""
    text = _URL.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    if "?" not in text or "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.query:
        return text
    query = [(k, REDACTED if is_secret_key(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def _redact_all(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_all(v) for v in value]
    return REDACTED if isinstance(value, str) else value


def redact_tree(tree: Any, path: tuple[str, ...] = ()) -> Any:
    """A copy of a recipe's dump (or any JSON-like tree) fit to be written down."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            where = (*path, str(key))
            if where in SECRET_SECTIONS:
                out[key] = _redact_all(value)
            elif is_secret_key(str(key)) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out[key] = REDACTED
            else:
                out[key] = redact_tree(value, where)
        return out
    if isinstance(tree, list):
        return [redact_tree(v, path) for v in tree]
    return redact_url(tree) if isinstance(tree, str) else tree


def drop_redacted(tree: Any) -> Any:
    """A recorded (redacted) recipe tree made loadable again: values that are *** are left out (the schema's
    default applies, the environment or an override supplies the secret) and redacted userinfo is removed
    from URLs."""
    if isinstance(tree, dict):
        return {k: drop_redacted(v) for k, v in tree.items() if v != REDACTED}
    if isinstance(tree, list):
        return [drop_redacted(v) for v in tree if v != REDACTED]
    if isinstance(tree, str):
        return tree.replace(f"://{REDACTED}@", "://")
    return tree
