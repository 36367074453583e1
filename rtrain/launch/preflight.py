"""Preflight: what a run needs from the world, checked before any worker or Ray starts (and by `rtrain
validate`), so a wrong path or a dead server costs a second and one line, not minutes and tracebacks.

- run.output_root can be created and written;
- data.source has a readable manifest for the train and the val split (local, http(s), s3/fsspec);
- the tracking store answers within tracking.connect_timeout_s (an http(s) server, a database's port) or its
  sqlite folder is writable;
- model.init_from exists;
- a checkpoint.dir in an object store takes a probe object (bucket, credentials, permission).
Every failure is one line naming the key and its value; the launcher exits 2 after printing them all.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rtrain.config import Recipe
from rtrain._errors import ExpectedError

DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


class PreflightError(ExpectedError):
    """One or more things the run needs are missing; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_root(recipe: Recipe, create: bool = True) -> str | None:
    """run.output_root can be created and written: by doing so (a launch), or, with create=False (`rtrain
    validate`, which leaves nothing behind), by a probe folder in the nearest folder that exists."""
    root = Path(recipe.run.output_root)
    if not create:  # a folder made and removed where the first missing one would go: leaves nothing behind
        here = _nearest_existing(root)
        try:
            os.rmdir(tempfile.mkdtemp(dir=here, prefix=".rtrain-preflight-"))
        except OSError as exc:
            return f"run.output_root={str(root)!r}: cannot create or write it ({_one_line(exc)})"
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".rtrain-preflight-"):
            pass
    except OSError as exc:
        return f"run.output_root={str(root)!r}: cannot create or write it ({_one_line(exc)})"
    return None


def check_data(recipe: Recipe) -> list[str]:
    from rtrain.data.sources import ShardSource

    data, problems = recipe.data, []
    for split in dict.fromkeys((data.train_split, data.val_split)):
        try:
            source = ShardSource(data.source, split, data.storage_options, data.allowed_shard_roots)
            manifest = source.read_manifest()
        except Exception as exc:  # noqa: BLE001 - missing file, HTTP, S3, bad JSON: all end as one line
            problems.append(f"data.source={data.source!r}: split {split!r} has no readable manifest "
                            f"({_one_line(exc)}); build one with `python -m data_prep.imagenet` or "
                            "`python -m data_prep.index`")
            continue
        if manifest.num_samples == 0:
            problems.append(f"data.source={data.source!r}: split {split!r} holds no samples")
    return problems


def _http_probe(uri: str, experiment: str, timeout_s: float) -> str | None:
    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        # unredirected: never sent on to where a redirect points (another origin may be anyone)
        request.add_unredirected_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # the experiment does not exist yet: the server answered
            return None
        if exc.code in (401, 403):
            return f"answers HTTP {exc.code}: set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD"
        return f"answers HTTP {exc.code} {exc.reason}: is it an MLflow tracking server?"
    except (OSError, ValueError) as exc:
        return (f"no MLflow server answers ({_one_line(exc)}; waited up to tracking.connect_timeout_s="
                f"{timeout_s:g} s)")
    return None


def _database_probe(uri: str, timeout_s: float) -> str | None:
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    host, port = parts.hostname or "localhost", parts.port or DB_PORTS.get(scheme)
    if port is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return (f"the database at {host}:{port} does not answer ({_one_line(exc)}; waited up to "
                f"tracking.connect_timeout_s={timeout_s:g} s)")


def check_tracking(recipe: Recipe) -> str | None:
    t = recipe.tracking
    if not t.enabled:
        return None
    if t.uri.startswith(("http://", "https://")):
        why = _http_probe(t.uri, t.experiment, t.connect_timeout_s)
    elif t.uri.startswith("sqlite:///"):
        folder = _nearest_existing(Path(t.uri[len("sqlite:///"):]).parent)  # the tracker makes the rest
        why = None if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else \
            f"its folder cannot be created or written ({folder} is not a writable folder)"
    else:
        why = _database_probe(t.uri, t.connect_timeout_s)
    return f"tracking.uri={t.uri!r}: {why}" if why else None


STORE_PROBE_TIMEOUT_S = 30.0


def check_checkpoint_store(recipe: Recipe) -> str | None:
    """checkpoint.dir in an object store: a probe object can be written there and removed (bucket, credentials,
    permissions), within STORE_PROBE_TIMEOUT_S (s3fs retries a dead endpoint for longer)."""
    url = str(recipe.checkpoint_dir)
    if "://" not in url:
        return None
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Late

    from rtrain._remote import filesystem

    def probe() -> None:
        fs, path = filesystem(url)
        key = f"{path.rstrip('/')}/.rtrain-preflight-{os.getpid()}-{os.urandom(4).hex()}"
        fs.pipe_file(key, b"rtrain preflight\n")
        fs.rm_file(key)

    pool = ThreadPoolExecutor(1, thread_name_prefix="rtrain-preflight")
    try:
        pool.submit(probe).result(timeout=STORE_PROBE_TIMEOUT_S)
    except Late:
        return f"checkpoint.dir={url!r}: the object store did not answer within {STORE_PROBE_TIMEOUT_S:g} s"
    except Exception as exc:  # noqa: BLE001 - no bucket, no credentials, no permission, no backend: one line
        return f"checkpoint.dir={url!r}: cannot write there ({_one_line(exc)[:300]})"
    finally:
        pool.shutdown(wait=False)
    return None


def check_init_from(recipe: Recipe) -> str | None:
    path = recipe.model.init_from
    if path and "://" not in path and not Path(path).is_file():
        return f"model.init_from={path!r}: no such file"
    return None


def preflight(recipe: Recipe, *, data: bool = True, create: bool = True) -> None:
    """Raise PreflightError naming everything that is missing. `recipe` has absolute paths (prepare_recipe).
    data=False skips the data and init_from checks (a custom --worker may not read them); create=False
    creates no folder (`rtrain validate`; an object-store probe is still written and removed)."""
    problems = [check_output_root(recipe, create), check_tracking(recipe), check_checkpoint_store(recipe)]
    if data:
        problems += [*check_data(recipe), check_init_from(recipe)]
    found = [p for p in problems if p]
    if found:
        raise PreflightError(found)
