"""Byte streams from where shards live: local files, http(s):// (urllib) and fsspec URLs (s3://, gs://, ...).

Opening is retried with exponential backoff (HTTP_ATTEMPTS tries, 0.5 s, 1 s, ...) when the failure may be
transient (5xx, connection errors, throttling); "not found" and "access denied" are final at once. Every
failure is a `ShardError` whose one-line message starts with the URL.

HTTP(S) bodies are streamed in one GET. fsspec files are seekable: each read is a range request served
through a read-ahead block of FSSPEC_BLOCK_BYTES, so a tar reader that steps over members it does not need
skips whole blocks only when the skipped members are larger than a block (for ImageNet-sized samples a
resumed slot re-reads its shard from the start, in a few large requests). s3fs retries each range request
itself. Object store credentials and endpoint come from the standard environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL[_S3]) or from
`storage_options` (the recipe's `data.storage_options`, passed to fsspec as is).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from rtrain._errors import ExpectedError
from rtrain._remote import filesystem

HTTP_TIMEOUT_S = 60.0
HTTP_ATTEMPTS = 3
FSSPEC_BLOCK_BYTES = 8 << 20
BACKOFF_S = 0.5


class ShardError(ExpectedError, RuntimeError):
    """A shard is missing, unreadable, truncated or fails its checksum; the message names it."""


def is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def is_remote(location: str) -> bool:
    """A URL that is not a local file (file:// and plain paths are local)."""
    return "://" in location and not location.startswith("file://")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def fsspec_target(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path) for an fsspec URL; ShardError when no backend is installed for its scheme."""
    try:
        return filesystem(location, storage_options)
    except (ImportError, ValueError) as exc:
        raise ShardError(f"{location}: no fsspec backend ({one_line(exc)})") from exc


@contextmanager
def open_stream(location: str, storage_options: dict[str, Any] | None = None) -> Iterator[BinaryIO]:
    """A readable binary stream of one object (seekable unless it is HTTP(S))."""
    if is_http(location):
        opener = _open_http
    elif is_remote(location):
        opener = _open_fsspec(storage_options)
    else:
        opener = _open_local
    handle = _with_retries(location, opener)
    with handle:
        yield handle


def _with_retries(location: str, opener: Any) -> BinaryIO:
    for attempt in range(HTTP_ATTEMPTS):
        try:
            return opener(location)
        except _Final as exc:
            raise ShardError(f"{location}: {exc}") from exc.__cause__
        except ShardError:
            raise
        except Exception as exc:  # noqa: BLE001 - network stacks raise many types; all are retried, then named
            if attempt == HTTP_ATTEMPTS - 1:
                reason = one_line(exc) if isinstance(exc, ConnectionError) else f"cannot read ({one_line(exc)})"
                raise ShardError(f"{location}: {reason}") from exc
        time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


class _Final(Exception):
    """A failure that retrying cannot fix; its message completes '<location>: '."""


def _open_local(location: str) -> BinaryIO:
    path = location.removeprefix("file://")
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise _Final("not found") from exc
    except OSError as exc:
        raise _Final(f"cannot open ({one_line(exc)})") from exc


def _open_http(url: str) -> BinaryIO:
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        # 4xx is final (the shard is not there); 5xx may be a busy server worth retrying.
        if exc.code < 500:
            raise _Final(f"HTTP {exc.code} {exc.reason}") from exc
        raise ConnectionError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ConnectionError(f"cannot connect ({exc.reason})") from exc


def _open_fsspec(storage_options: dict[str, Any] | None) -> Any:
    def opener(location: str) -> BinaryIO:
        fs, path = fsspec_target(location, storage_options)
        try:
            return fs.open(path, "rb", block_size=FSSPEC_BLOCK_BYTES, cache_type="readahead")
        except FileNotFoundError as exc:
            raise _Final(f"not found ({one_line(exc)})") from exc
        except PermissionError as exc:
            raise _Final(f"access denied ({one_line(exc)})") from exc
        except IsADirectoryError as exc:
            raise _Final("is a folder, not an object") from exc

    return opener
