"""Real training with MLflow on, against a real `mlflow server --serve-artifacts` with a sqlite and with a
PostgreSQL backend store: the 2-worker quickstart (tiny, CPU, local launcher) records one run with its params,
tags, metrics at the expected steps, checkpoints (uploaded or as URIs), layer responses and final weights; a run
SIGKILLed after it logged steps its last checkpoint does not hold, then rerun, keeps one run in which every
step's metrics appear exactly once and ends FINISHED; `rtrain compare` reads both runs back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow_services import artifact_paths, metric_steps, running_server
from ray_runs import REPO, checkpoint_steps, launch_command, quickstart_overrides, wait_for
from testkit import free_port

from cluster.local import postgres

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 14  # 11 steps per epoch at 2 workers: evals and layer responses at steps 11 and 14
EXPERIMENT = "e2e"
BLOCKS = 9  # cifar_resnet20: 3 stages x 3 residual blocks


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request):
    with running_server(request.param, free_port(), free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cmd(shards: Path, out: Path, server, name: str, *extra: str) -> list[str]:
    return launch_command(quickstart_overrides(
        shards, out, name, STEPS, "dist.launcher=local", "train.log_every_steps=1", "eval.every_epochs=1",
        f"tracking.uri={server.url}", f"tracking.experiment={EXPERIMENT}",
        "analysis.layer_responses.every_epochs=1", *extra))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def _one_run(client, name: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def straight(server, client, digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"straight-{server.backend}")
    _run(_cmd(digits_shards, out, server, "straight", "checkpoint.every_steps=5",
              "tracking.log_checkpoints=upload", "tracking.system_metrics=true",
              "tracking.system_metrics_interval_s=1"))
    return _one_run(client, "straight")


@pytest.fixture(scope="module")
def killed(server, client, digits_shards, tmp_path_factory):
    """SIGKILLed (no checkpoint, no closing) once MLflow holds steps beyond the last checkpoint; then rerun."""
    out = tmp_path_factory.mktemp(f"killed-{server.backend}")
    cmd = _cmd(digits_shards, out, server, "killed", "checkpoint.every_steps=4", "tracking.log_checkpoints=uri")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    try:
        def logged_past_checkpoint() -> bool:
            saved = checkpoint_steps(out, "killed")
            try:
                run = _one_run(client, "killed")
            except (AssertionError, AttributeError):
                return False
            logged = max(metric_steps(client, run.info.run_id, "train/loss"), default=0)
            return bool(saved) and logged >= max(saved) + 2 or proc.poll() is not None
        wait_for(logged_past_checkpoint, 300, "steps logged beyond the last checkpoint", poll_s=0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run = _one_run(client, "killed")
    before = {"status": run.info.status, "logged": max(metric_steps(client, run.info.run_id, "train/loss")),
              "checkpoint": max(checkpoint_steps(out, "killed"))}
    resumed = _run(cmd)
    assert "resumed from" in resumed.stderr
    return before, _one_run(client, "killed"), out


def test_run_records_params_tags_metrics_artifacts(straight, client):
    run, run_id = straight, straight.info.run_id
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["train.max_steps"] == str(STEPS) and params["model.name"] == "cifar_resnet20"
    assert params["tracking.log_checkpoints"] == "upload" and params["dist.num_workers"] == "2"
    assert tags["rtrain.world_size"] == "2" and tags["rtrain.version"] and tags["rtrain.hosts"]
    assert tags["rtrain.steps_per_epoch"] == "11"
    if (REPO / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
    every_step = list(range(1, STEPS + 1))
    for key in ("train/loss", "train/lr", "train/images_per_s", "train/top1_error", "train/top5_error",
                "train/loss_scale", "train/skipped_samples"):
        assert metric_steps(client, run_id, key) == every_step, key
    for key in ("val/top1_error", "val/top5_error", "val/loss"):
        assert metric_steps(client, run_id, key) == [11, STEPS], key
    # one node id per host: both ranks run here, so one monitor (rank 0's) under this host's name
    nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    assert nodes == {socket.gethostname()} and f"system/{socket.gethostname()}/cpu_utilization_percentage" in \
        run.data.metrics
    artifacts = artifact_paths(client, run_id)
    for step in (5, 10, STEPS):
        assert f"checkpoints/step-{step:09d}/MANIFEST.json" in artifacts
        assert tags[f"rtrain.checkpoint.step-{step:09d}"].startswith("file://")
    assert {"recipe.yaml", "model/state_dict.pt", "layer_responses/step-000000011.png",
            "layer_responses/step-000000014.png"} <= set(artifacts)


def test_layer_responses_logged_once_per_residual_block(straight, client):
    keys = sorted(k for k in straight.data.metrics if k.startswith("layer_response/"))
    assert keys == [f"layer_response/block_{i:03d}" for i in range(1, BLOCKS + 1)]
    for key in keys:
        history = client.get_metric_history(straight.info.run_id, key)
        assert [m.step for m in history] == [11, STEPS] and all(m.value > 0 for m in history)


def test_killed_and_rerun_logs_every_step_exactly_once(killed, client):
    before, run, _out = killed
    assert before["status"] == "RUNNING"  # a SIGKILL leaves no one to close the run
    assert before["logged"] > before["checkpoint"]  # steps were logged that the resume trains again
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["rtrain.resumes"] == "1"
    assert f"from the checkpoint of step {before['checkpoint']}" in run.data.tags["rtrain.resume.1"]
    for key in ("train/loss", "train/lr", "train/top1_error"):
        assert metric_steps(client, run_id, key) == list(range(1, STEPS + 1)), key
    assert metric_steps(client, run_id, "val/top1_error") == [11, STEPS]
    assert metric_steps(client, run_id, "layer_response/block_001") == [11, STEPS]
    # log_checkpoints=uri: each checkpoint is a tag naming its folder; nothing uploaded.
    for step in (4, 8, 12, STEPS):
        assert run.data.tags[f"rtrain.checkpoint.step-{step:09d}"].endswith(f"/killed/checkpoints/step-{step:09d}")
    assert not any(p.startswith("checkpoints/") for p in artifact_paths(client, run_id))


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtrain.cli", "compare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=_env())


def test_compare_two_real_runs(straight, killed, server, client, tmp_path):
    from matplotlib.image import imread

    png = tmp_path / "compare.png"
    done = _compare("--tracking-uri", server.url, "--experiment", EXPERIMENT, "--runs", "straight", "killed",
                    "--out", str(png), "--format", "csv", "--layer-responses")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:3]]
    assert header[:3] == ["run", "run_id", "status"]
    assert {"checkpoint.every_steps", "tracking.log_checkpoints", "tracking.system_metrics"} <= set(header)
    assert "train.max_steps" not in header  # the same in both runs
    assert [row[0] for row in rows] == ["straight", "killed"]
    final = header.index("final val/top1_error")
    for row, run in zip(rows, (straight, killed[1])):
        assert row[1] == run.info.run_id[:8] and row[2] == "FINISHED"
        assert row[final] == f"{run.data.metrics['val/top1_error']:.4f}"
        assert row[header.index("goodput")] == f"{run.data.metrics['goodput']:.4f}"
    restart, redone = header.index("lost/restart s"), header.index("lost/recomputed s")
    assert rows[0][restart] == "0.0" and float(rows[1][restart]) > 0  # the killed run was down, then rerun
    assert float(rows[1][redone]) > 0  # it ran the steps after its last checkpoint again
    for path, size in ((png, (500, 800)), (tmp_path / "compare-layer-responses.png", (600, 800))):
        pixels = imread(path)
        assert pixels.shape[:2] == size and float(np.var(pixels)) > 1e-3, path

    nothing = _compare("--tracking-uri", server.url, "--experiment", EXPERIMENT, "--runs", "no-such-run")
    assert nothing.returncode == 1
    assert nothing.stderr.strip() == (f"rtrain: no runs match 'no-such-run' in experiment '{EXPERIMENT}' "
                                      f"at {server.url}")


def test_the_postgres_store_wants_its_password_which_is_written_nowhere_else(server):
    if server.pg is None:
        pytest.skip("the sqlite store has no login")
    pg = server.pg
    argv = [str(postgres.bin_dir() / "psql"), "-w", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", "-tAc",
            "SELECT 1", "mlflow"]
    plain = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    denied = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**plain, "PGPASSFILE": os.devnull})
    assert denied.returncode != 0 and "password" in denied.stderr, denied.stderr
    allowed = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**plain, **pg.client_env})
    assert allowed.stdout.strip() == "1", allowed.stderr
    password = pg.passfile.read_text().strip().rsplit(":", 1)[1]
    assert oct(pg.passfile.stat().st_mode & 0o777) == "0o600"
    for path in server.root.rglob("*"):
        if path.is_file() and path != pg.passfile and not path.is_relative_to(pg.root / "data"):
            assert password.encode() not in path.read_bytes(), path
    for pid in (int(server.pid_file.read_text()), pg.pid):
        assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_resuming_another_runs_checkpoint_starts_a_new_run_and_leaves_that_one_as_it_was(straight, server, client,
                                                                                       digits_shards, tmp_path):
    if server.backend != "sqlite":
        pytest.skip("the rule is rtrain's, not the store's: one backend shows it")
    source = straight.data.tags["rtrain.checkpoint.step-000000010"].removeprefix("file://")
    before = client.get_run(straight.info.run_id)
    before_artifacts = sorted(artifact_paths(client, straight.info.run_id))
    done = _run(_cmd(digits_shards, tmp_path, server, "adopter", f"checkpoint.resume={source}"))
    assert "resumed from" in done.stderr
    adopter = _one_run(client, "adopter")
    assert adopter.info.run_id != straight.info.run_id and adopter.info.status == "FINISHED"
    assert adopter.data.tags["rtrain.resumed_from_run"] == straight.info.run_id
    assert adopter.data.tags["rtrain.resumed_from_checkpoint"] == source
    assert metric_steps(client, adopter.info.run_id, "train/loss") == list(range(11, STEPS + 1))
    after = client.get_run(straight.info.run_id)
    assert after.data.tags == before.data.tags and after.data.params == before.data.params
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert sorted(artifact_paths(client, straight.info.run_id)) == before_artifacts
    assert metric_steps(client, straight.info.run_id, "train/loss") == list(range(1, STEPS + 1))
