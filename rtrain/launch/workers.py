"""Which function each worker runs, and the import path it runs with."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rtrain._ports import unused_port
from rtrain.launch.errors import LaunchError

WorkerFn = Callable[[dict], Any]
LOOPBACK = "127.0.0.1"


def default_worker() -> WorkerFn:
    try:
        from rtrain.launch.worker import run_worker
    except ImportError as exc:
        raise LaunchError(f"cannot import the training worker rtrain.launch.worker.run_worker: {exc}") from exc
    return run_worker


def worker_reference(fn: WorkerFn) -> str:
    """"module:qualname" of a function a fresh interpreter can import (local processes re-import it)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise LaunchError(f"worker function {fn!r} must be a module-level function of an importable module")
    return f"{module}:{qualname}"


def load_worker(reference: str) -> WorkerFn:
    module_name, _, qualname = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def load_worker_or_fail(reference: str) -> WorkerFn:
    if ":" not in reference:
        raise LaunchError(f"--worker {reference!r}: expected MODULE:FUNCTION")
    try:
        return load_worker(reference)
    except (ImportError, AttributeError) as exc:
        raise LaunchError(f"--worker {reference!r}: cannot import it ({exc})") from None


def python_path() -> str:
    """The launcher's own import path, so workers import rtrain (and a --worker module) the way it does.

    The interpreter's stdlib and site-packages are left out: each worker's Python brings its own.
    """
    installs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries = []
    for entry in sys.path:
        path = Path(entry or os.curdir).resolve()
        # Path-hook markers of editable installs are not folders; the workers' site-packages has them too.
        if path.exists() and not any(path.is_relative_to(root) for root in installs):
            entries.append(str(path))
    return os.pathsep.join(dict.fromkeys(entries))


def free_port(host: str = LOOPBACK) -> int:
    return unused_port(host)


def lost_a_peer(error: BaseException) -> bool:
    """A collective that failed because another rank went away: a consequence, not the cause."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistBackendError) or any(
        mark in text for mark in ("DistBackendError", "gloo", "NCCL", "Connection reset by peer",
                                  "Connection closed by peer"))
