"""Preflight against the real things: a port with nothing listening, a real `mlflow server`, a missing
directory, a real HTTP server without a manifest, an unwritable output root, a missing init_from. Each
failure is one `rtrain:` line naming the key and value, exit 2, before any worker or Ray starts."""

from __future__ import annotations

import functools
import re
import http.server
import subprocess
import sys
import threading

import pytest

from cluster.local import mlflow_server
from cluster.local.procs import stop_by_pid_file

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _rtrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return _rtrain("-m", "rtrain.launch", "recipes/quickstart.yaml", *overrides)


def _base(shards, tmp_path) -> list[str]:
    return [f"data.source={shards}", f"run.output_root={tmp_path / 'runs'}", "run.name=pf",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "dist.launcher=local"]


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return done.stderr.strip().splitlines()


def test_tracking_port_with_nothing_listening_is_refused_before_any_worker(digits_shards, tmp_path, port):
    done = _launch(*_base(digits_shards, tmp_path), f"tracking.uri=http://127.0.0.1:{port}",
                   "tracking.connect_timeout_s=2")
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = _lines(done)
    assert line.startswith(f"rtrain: tracking.uri='http://127.0.0.1:{port}': no MLflow server answers")
    assert not (tmp_path / "runs" / "pf").exists()  # nothing started, nothing written


def test_a_real_mlflow_server_passes(digits_shards, tmp_path, port):
    server = mlflow_server.start_server(tmp_path / "db" / "mlflow.db", port=port)
    try:
        done = _rtrain("-m", "rtrain.cli", "validate", "recipes/quickstart.yaml", *_base(digits_shards, tmp_path),
                       f"tracking.uri={server.url}")
    finally:
        stop_by_pid_file(server.pid_file, expect_in_cmdline="mlflow")
    assert done.returncode == 0, done.stderr
    assert f"uri: {server.url}" in done.stdout


def test_validate_by_name_checks_everything_and_creates_nothing(digits_shards, tmp_path):
    """A packaged recipe by name; the output root, the sqlite folder and the run directory do not exist before
    and do not after (a launch makes them)."""
    done = _rtrain("-m", "rtrain.cli", "validate", "quickstart", f"data.source={digits_shards}",
                   f"run.output_root={tmp_path}/new/runs", f"tracking.uri=sqlite:///{tmp_path}/new/db/mlflow.db")
    assert done.returncode == 0, done.stderr
    assert "name: quickstart" in done.stdout and list(tmp_path.iterdir()) == []
    done = _rtrain("-m", "rtrain.cli", "validate", "quickstart", f"data.source={digits_shards}",
                   "run.output_root=/proc/rtrain-runs")
    assert done.returncode == 2 and done.stderr.startswith("rtrain: run.output_root='/proc/rtrain-runs': ")


def test_missing_data_directory_names_the_key_in_validate_and_launch(digits_shards, tmp_path):
    overrides = [*_base(digits_shards, tmp_path), f"data.source={tmp_path}/no/such/dir"]
    for done in (_rtrain("-m", "rtrain.cli", "validate", "recipes/quickstart.yaml", *overrides), _launch(*overrides)):
        assert done.returncode == 2
        lines = _lines(done)
        assert len(lines) == 2 and "Traceback" not in done.stderr  # one line per split
        assert lines[0].startswith(f"rtrain: data.source='{tmp_path}/no/such/dir': split 'train' has no readable "
                                   "manifest")


def test_http_server_without_a_manifest(digits_shards, tmp_path):
    (tmp_path / "www" / "train").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        done = _launch(*_base(digits_shards, tmp_path), f"data.source={url}")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2
    assert _lines(done)[0].startswith(f"rtrain: data.source='{url}': split 'train' has no readable manifest")
    assert "404" in _lines(done)[0]


def test_unwritable_output_root_and_missing_init_from(digits_shards, tmp_path):
    done = _launch(*_base(digits_shards, tmp_path), "run.output_root=/proc/rtrain-runs",
                   f"model.init_from={tmp_path}/missing.pt")
    assert done.returncode == 2
    lines = _lines(done)
    assert lines[0].startswith("rtrain: run.output_root='/proc/rtrain-runs': cannot create or write it")
    assert lines[1] == f"rtrain: model.init_from='{tmp_path}/missing.pt': no such file"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".."])
def test_run_name_must_be_a_plain_name(tmp_path, name):
    done = _rtrain("-m", "rtrain.cli", "validate", "--schema-only", "recipes/quickstart.yaml", f"run.name={name}")
    assert done.returncode == 2
    assert "run.name: not a plain name" in done.stderr


def _garbage_init(digits_shards, tmp_path, launcher: str, *extra: str) -> subprocess.CompletedProcess:
    """Preflight passes (the file exists); every rank then fails to read it: an expected failure."""
    weights = tmp_path / "not-weights.pt"
    weights.write_text("not a state dict\n")
    return _launch(*_base(digits_shards, tmp_path), f"model.init_from={weights}", f"dist.launcher={launcher}",
                   f"run.name=garbage-{launcher}", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_an_expected_failure_in_the_ranks_ends_in_one_line(digits_shards, tmp_path, launcher):
    done = _garbage_init(digits_shards, tmp_path, launcher)
    assert done.returncode == 1
    last = _lines(done)[-1]
    assert re.search(rf"rank \d failed: WeightsFileError: model.init_from: {tmp_path}/not-weights.pt: cannot read weights", last)
    if launcher == "local":
        assert "Traceback" not in done.stderr  # each rank says it in one line; the launcher names the first
    else:  # Ray's own log lines repeat the worker's error, with one frame of rtrain's at most
        assert "in _train" not in done.stderr and "load_weights_file" not in done.stderr


@pytest.mark.slow
def test_debug_keeps_the_traceback(digits_shards, tmp_path):
    done = _garbage_init(digits_shards, tmp_path, "local", "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "load_weights_file" in done.stderr
