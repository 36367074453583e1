"""Object-store locations shared by the data side (shards) and checkpoints: fsspec filesystems for URLs
(s3://, gs://, ...) with credentials and endpoint from the standard environment, and ObjectPath, a URL that
reads like a pathlib.Path where rtrain names a checkpoint (`/`, `.name`, `.parent`).

fsspec is imported only when a filesystem is asked for. Nothing here writes a credential anywhere.
"""

from __future__ import annotations

import os
import re
from typing import Any

# botocore retries a call that timed out 4 times (its legacy mode) inside each of s3fs's 5 tries (which also
# cover throttling: SlowDown): a server that stopped answering held a call for about 14 minutes. Two attempts
# per try (s3fs's own timeouts: 5 s to connect, 15 s per read) bound it to a few minutes.
S3_RETRIES = {"mode": "standard", "total_max_attempts": 2}


def is_url(location: Any) -> bool:
    return "://" in str(location)


class ObjectPath(str):
    """A location in an object store: `root / "step-000000009"`, `.name`, `.parent`, `.as_uri()`."""

    def __new__(cls, location: str) -> ObjectPath:
        scheme, sep, rest = str(location).partition("://")
        if sep:  # `s3://b//run/` and `s3://b/run` are one place (a store's listing never shows the empty part)
            return super().__new__(cls, f"{scheme}://{re.sub('/+', '/', rest).rstrip('/')}")
        return super().__new__(cls, str(location).rstrip("/"))

    def __truediv__(self, other: Any) -> ObjectPath:
        return ObjectPath(f"{self}/{str(other).strip('/')}")

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.rsplit("/", 1)[0])

    def resolve(self) -> ObjectPath:
        return self

    def as_uri(self) -> str:
        return str(self)


def s3_options(location: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """fsspec options for a URL: the given ones, plus, for s3://, the endpoint from AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL when the options do not name one (not every botocore build reads them) and botocore's
    retries bounded when they set none."""
    options = dict(storage_options or {})
    if not location.startswith(("s3://", "s3a://")):
        return options
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options:
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        options["client_kwargs"] = client_kwargs
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_RETRIES))
    options["config_kwargs"] = config
    return options


def filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path in it) for a URL; ImportError or ValueError when no backend handles it."""
    import fsspec.core

    return fsspec.core.url_to_fs(location, **s3_options(location, storage_options))
