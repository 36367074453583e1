"""Object-store locations shared by the data side (shards) and checkpoints: fsspec filesystems for URLs
(s3://, gs://, ...) with credentials and endpoint from the standard environment, and ObjectPath, a URL that
reads like a pathlib.Path where rtrain names a checkpoint (`/`, `.name`, `.parent`).

fsspec is imported only when a filesystem is asked for. Nothing here writes a credential anywhere.
"""

from __future__ import annotations

import os
from typing import Any


def is_url(location: Any) -> bool:
    return "://" in str(location)


class ObjectPath(str):
    """A location in an object store: `root / "step-000000009"`, `.name`, `.parent`, `.as_uri()`."""

    def __new__(cls, location: str) -> ObjectPath:
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
    """fsspec options for a URL: the given ones, plus the endpoint from AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL for s3:// when the options do not name one (not every botocore build reads them)."""
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if location.startswith(("s3://", "s3a://")) and endpoint and "endpoint_url" not in options:
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        options["client_kwargs"] = client_kwargs
    return options


def filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path in it) for a URL; ImportError or ValueError when no backend handles it."""
    import fsspec.core

    return fsspec.core.url_to_fs(location, **s3_options(location, storage_options))
