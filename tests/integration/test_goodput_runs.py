"""Goodput and the ranks' structured logs of a real run: the session's straight reference run (no launch of
its own). A killed and resumed run's are checked in test_resume_kill.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ray_runs import REPO, STEPS, mlflow_runs, run_env

from rtrain.tracking.events import read_events
from rtrain.tracking.goodput import attempts_of, summarize

pytestmark = pytest.mark.integration


def test_a_straight_run_logs_every_rank_and_its_goodput_is_all_but_start_up_and_eval(reference_run):
    run_dir = reference_run.out / reference_run.name
    ranks = {rank: read_events(run_dir / "logs" / f"rank-{rank}.jsonl") for rank in (0, 1)}
    for rank, records in ranks.items():
        [attempt] = attempts_of(records)
        assert attempt.reason == "finished" and attempt.step == STEPS and attempt.resumed_step == 0
        events = [r["event"] for r in records]
        assert events[:2] == ["attempt", "start"] and events[-1] == "end" and "checkpoint" in events
        windows = [r for r in records if r["event"] == "window"]
        assert [w["step"] for w in windows] == list(range(3, STEPS, 3)) + [STEPS]  # train.log_every_steps=3
        assert all(w["rank"] == rank and w["step_s"] > 0 and w["data_wait_s"] >= 0 for w in windows)
    [run] = mlflow_runs(reference_run.out, reference_run.name)
    metrics, logged = run.data.metrics, summarize(ranks[0])
    for key in ("goodput", "goodput/wall_s", "lost/startup", "lost/eval", "lost/checkpoint_blocking"):
        assert metrics[key] == pytest.approx(logged[key], rel=0.05), key  # MLflow's end figures: rank 0's log
    assert metrics["lost/restart"] == 0 and metrics["lost/recomputed"] == 0
    wall = metrics["goodput/wall_s"]
    named = sum(metrics[f"lost/{k}"] for k in ("startup", "eval", "data_wait", "checkpoint_blocking"))
    assert metrics["goodput"] * wall + named + metrics["lost/unaccounted"] == pytest.approx(wall)
    assert 0 <= metrics["lost/unaccounted"] < 0.2 * wall  # what no record measures stays small
    assert run.data.tags["rtrain.attempt.1"].startswith("finished; ") and f"steps 0-{STEPS}" in \
        run.data.tags["rtrain.attempt.1"]


def test_rtrain_status_of_a_finished_run_is_one_screen_and_writes_nothing(reference_run):
    run_dir = reference_run.out / reference_run.name
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    done = subprocess.run([sys.executable, "-m", "rtrain.cli", "status", str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=run_env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"run         {run_dir}" and lines[1].startswith("state       finished: at ")
    assert lines[2] == f"step        {STEPS}/{STEPS} (100%)"
    assert lines[3].startswith("attempts    1  finished ") and f"steps 0-{STEPS}  hosts " in lines[3]
    assert lines[4].startswith("goodput     0.") and lines[5].startswith("lost        restart 0.0 s, startup ")
    assert lines[6].startswith(f"checkpoint  step {STEPS} at ")
    assert lines[7].startswith("slowest     rank ") and "dominated)" in lines[7]
    [run] = mlflow_runs(reference_run.out, reference_run.name)
    assert lines[8] == (f"mlflow      run {run.info.run_id} (experiment {reference_run.name!r}) at "
                        f"sqlite:///{reference_run.out}/mlflow.db: mlflow ui --backend-store-uri "
                        f"sqlite:///{reference_run.out}/mlflow.db")
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before  # read-only
    missing = subprocess.run([sys.executable, "-m", "rtrain.cli", "status", str(run_dir / "nope")], cwd=REPO,
                             capture_output=True, text=True, timeout=120, env=run_env())
    assert missing.returncode == 2 and missing.stderr.startswith(f"rtrain: {run_dir / 'nope'}: no logs/ folder")
