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

REDACTED = "***"
SECRET_KEY = re.compile(r"(pass(word|wd)?|pwd|secret|token|jwt|credential|api[_-]?key|access[_-]?key|"
                        r"private[_-]?key|session[_-]?key|account[_-]?key|ssh[_-]?key|connection[_-]?string|"
                        r"cookie|auth|signature|^sig$|^sas$|^key$)", re.I)
SECRET_SECTIONS = (("data", "storage_options"),)
# A URL in free text: scheme://, then up to whitespace or a quote. Its userinfo runs to the authority's last @.
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/?#]*@", re.I)
_PARAM = re.compile(r"([?&;#])([^=&;#\s]+)=([^&;#\s]*)")


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def _redact_one_url(url: str) -> str:
    url = _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", url)
    return _PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if is_secret_key(m.group(2)) else m.group(0),
                      url)


def redact_url(text: str) -> str:
    """`text` with, in every URL in it, the userinfo and the values of secret-looking query and fragment
    parameters (`?token=`, `#access_token=`) replaced by ***; the rest of the text as it was."""
    return _URL.sub(lambda m: _redact_one_url(m.group(0)), text) if "://" in text else text


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
            elif is_secret_key(str(key)) and not isinstance(value, bool) and value is not None:
                out[key] = _redact_all(value) if isinstance(value, (dict, list)) else REDACTED
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
