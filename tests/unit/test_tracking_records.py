"""Exactly-once metrics across resumes, the outbox, the recipe's tracking switches, layer responses and
`rtrain compare`'s table and PNGs, against a real sqlite MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtrain.config import RecipeError, recipe_from_dict
from rtrain.engine.responses import layer_responses, residual_blocks
from rtrain.engine.step import top_hits
from rtrain.tracking import build_tracker, run_id_from_state
from rtrain.tracking import compare as cmp
from rtrain.tracking.outbox import Outbox
from rtrain.tracking.run_info import error_text, http_environment

REPO = Path(__file__).resolve().parents[2]


def _recipe(uri: str, experiment: str, name: str = "tiny", root: Path | None = None, **tracking):
    return recipe_from_dict({"run": {"name": name, "output_root": str(root or "runs")},
                             "tracking": {"uri": uri, "experiment": experiment, **tracking}})


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_resume_logs_each_metric_step_once(db_uri, client, tmp_path):
    recipe = _recipe(db_uri, "exactly-once", root=tmp_path)
    first = build_tracker(recipe, rank=0)
    for step in range(1, 6):  # the checkpoint was at step 2; steps 3..5 were logged, then a crash
        first.log_metrics({"train/loss": 1.0 / step}, step=step)
    first.log_metrics({"val/top1_error": 0.5}, step=4)
    state = {"version": 2, "run_id": first.run_id, "resumes": 0}

    resumed = build_tracker(recipe, rank=0, resume_state=state, resume_step=2)
    assert resumed.run_id == first.run_id and resumed.logged_through == {"train/loss": 5, "val/top1_error": 4}
    for step in range(3, 8):  # trained again from the checkpoint
        resumed.log_metrics({"train/loss": 1.0 / step, "val/top1_error": 0.25}, step=step)
    resumed.finish()

    run = client.get_run(first.run_id)
    assert _steps(client, first.run_id, "train/loss") == [1, 2, 3, 4, 5, 6, 7]
    assert _steps(client, first.run_id, "val/top1_error") == [4, 5, 6, 7]
    assert run.data.tags["rtrain.resumes"] == "1" and resumed.state_dict()["resumes"] == 1
    assert "from the checkpoint of step 2; the run was RUNNING" in run.data.tags["rtrain.resume.1"]
    assert "logged through step 5" in run.data.tags["rtrain.resume.1"]


def test_failed_run_names_its_error_and_version_1_states_still_resume(db_uri, client, tmp_path):
    recipe = _recipe(db_uri, "failed", root=tmp_path)
    tracker = build_tracker(recipe, rank=0)
    old_state = {"version": 1, "run_id": tracker.run_id}  # a checkpoint written before resume counts
    again = build_tracker(recipe, rank=0, resume_state=old_state)
    assert again.run_id == tracker.run_id and run_id_from_state(old_state) == tracker.run_id
    again.finish("FAILED", error=ValueError("loss diverged\nat step 7"))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["rtrain.error"] == "ValueError: loss diverged at step 7"


def test_outbox_keeps_what_failed_in_order(tmp_path):
    box = Outbox(tmp_path / "tracking" / "unsent.jsonl")
    for step in (1, 2, 3):
        box.append({"kind": "metrics", "run_id": "r", "step": step, "timestamp": 0, "metrics": {"loss": step}})
    box.append({"kind": "tags", "run_id": "r", "tags": {"a": "b"}})
    with box.path.open("a") as f:
        f.write('{"kind": "metrics", "run_id"')  # a line cut short by a kill
    assert len(box) == 4 and box.pending_steps("r") == {"loss": 3} and box.pending_steps("other") == {}

    sent = []

    def send(record):
        if record.get("step") == 3:
            raise ConnectionRefusedError("server away")
        sent.append(record)

    with pytest.raises(ConnectionRefusedError):
        box.flush(send)
    assert [r.get("step") for r in sent] == [1, 2]
    assert [r.get("step") for r in box.records()] == [3, None]
    assert box.flush(sent.append) == 2 and not box.path.exists()


def test_tracking_switches_in_the_recipe():
    assert recipe_from_dict({"tracking": {"log_checkpoints": True}}).tracking.log_checkpoints == "upload"
    assert recipe_from_dict({"tracking": {"log_checkpoints": False}}).tracking.log_checkpoints == "none"
    assert recipe_from_dict({}).tracking.log_checkpoints == "uri"  # multi-GB files are not sent by default
    with pytest.raises(RecipeError, match="tracking.log_checkpoints: Input should be 'none', 'uri' or 'upload'"):
        recipe_from_dict({}).with_overrides(["tracking.log_checkpoints=everything"])
    recipe = recipe_from_dict({}).with_overrides(["analysis.layer_responses.every_epochs=3",
                                                  "tracking.http_timeout_s=7"])
    assert recipe.analysis.layer_responses.every_epochs == 3
    assert http_environment(recipe.tracking) == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "7",
                                                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                                                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    assert error_text("x" * 9000).endswith("...") and len(error_text("x" * 9000)) == 5000


@pytest.mark.parametrize("name,blocks", [("cifar_resnet20", 9), ("cifar_plain20", 9), ("resnet18", 8)])
def test_layer_responses_one_std_per_block(name, blocks):
    from rtrain.config import ModelConfig
    from rtrain.models import model_from_config

    model = model_from_config(ModelConfig(name=name), 10, 0).train()
    size = 64 if name == "resnet18" else 32
    stds = layer_responses(model, torch.randn(4, 3, size, size))
    assert len(stds) == len(residual_blocks(model)) == blocks and all(s > 0 for s in stds)
    assert model.training  # left as it was


def test_top_hits_counts_top1_and_top5():
    logits = torch.tensor([[0.0, 9, 1, 2, 3, 4, 5], [9.0, 0, 1, 2, 3, 4, 5]])
    assert top_hits(logits, torch.tensor([1, 1])).tolist() == [1.0, 1.0, 2.0]


def _two_runs(uri: str, tmp_path: Path) -> list[str]:
    ids = []
    for name, lr in (("lr-0.1", 0.1), ("lr-0.2", 0.2)):
        recipe = _recipe(uri, "compare", name=name, root=tmp_path).with_overrides([f"optim.lr={lr}",
                                                                                    "optim.base_lr_per_256=null"])
        tracker = build_tracker(recipe, rank=0, run_tags={"rtrain.steps_per_epoch": "10"})
        for step in range(1, 31):
            tracker.log_metrics({"train/top1_error": lr + 1 / step, "val/top1_error": lr + 2 / step}, step=step)
        tracker.log_metrics({f"layer_response/block_{i:03d}": lr * i for i in range(1, 4)}, step=30)
        tracker.finish()
        ids.append(tracker.run_id)
    return ids


def test_compare_table_formats_and_pngs(db_uri, client, tmp_path):
    from matplotlib.image import imread

    ids = _two_runs(db_uri, tmp_path)
    runs = [cmp.load_curves(client, r, cmp.metric_keys(None))
            for r in cmp.find_runs(client, db_uri, "compare", ["lr-0.1", ids[1]])]
    header, rows = cmp.table_rows(runs, cmp.metric_keys(None))
    assert header == ["run", "run_id", "status", "optim.lr", "final train/top1_error", "best train/top1_error",
                      "final val/top1_error", "best val/top1_error"]
    assert rows[0] == ["lr-0.1", ids[0][:8], "FINISHED", "0.1", f"{0.1 + 1 / 30:.4f}", f"{0.1 + 1 / 30:.4f}",
                       f"{0.1 + 2 / 30:.4f}", f"{0.1 + 2 / 30:.4f}"]
    assert cmp.render(header, rows, "csv").splitlines()[1].startswith(f"lr-0.1,{ids[0][:8]},FINISHED,0.1,")
    assert cmp.render(header, rows, "markdown").splitlines()[1] == "|" + "|".join(["---"] * len(header)) + "|"
    for path, size in ((cmp.plot_curves(runs, cmp.metric_keys(None), tmp_path / "c.png"), (500, 800)),
                       (cmp.plot_layer_responses(client, runs, tmp_path / "l.png"), (600, 800))):
        pixels = imread(path)
        assert pixels.shape[:2] == size and float(np.var(pixels)) > 1e-3
    with pytest.raises(cmp.NoRunsError, match="no runs match 'nobody' in experiment 'compare'"):
        cmp.find_runs(client, db_uri, "compare", ["nobody"])


@pytest.mark.slow  # three CLI processes, each importing MLflow
def test_compare_cli_says_when_nothing_matches(db_uri, tmp_path):
    def compare(*args):
        return subprocess.run([sys.executable, "-m", "rtrain.cli", "compare", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    build_tracker(_recipe(db_uri, "cli", root=tmp_path), rank=0).finish()  # an experiment with one run
    missing = compare("--tracking-uri", db_uri, "--experiment", "absent")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"rtrain: no runs match: experiment 'absent' does not exist at {db_uri}"
    no_db = compare("--tracking-uri", f"sqlite:///{tmp_path}/none.db")
    assert no_db.returncode == 2 and "no such sqlite database" in no_db.stderr
    listed = compare("--tracking-uri", db_uri, "--experiment", "cli", "--format", "csv", "--metric", "loss")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == "run,run_id,status,final train/loss,best train/loss,final val/loss,best val/loss"


def test_an_outbox_record_naming_a_file_outside_the_run_is_not_uploaded(db_uri, client, tmp_path):
    """The outbox is a file in the run directory that anyone with access could edit: replaying it uploads only
    files inside the run's own folders (run directory, checkpoint folder)."""
    import json

    recipe = _recipe(db_uri, "outbox-paths", root=tmp_path / "runs")
    tracker = build_tracker(recipe, rank=0)
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("not for the tracking server\n")
    mine = recipe.run_dir / "notes.txt"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("a file of the run\n")
    outbox = recipe.run_dir / "tracking" / "unsent.jsonl"
    outbox.parent.mkdir(parents=True, exist_ok=True)
    records = [{"kind": "artifact", "run_id": tracker.run_id, "path": str(p), "artifact_path": "extra"}
               for p in (secret, mine)]
    outbox.write_text("".join(json.dumps(r) + "\n" for r in records))
    again = build_tracker(recipe, rank=0, resume_state={"version": 2, "run_id": tracker.run_id, "resumes": 0})
    again.finish()
    uploaded = [a.path for a in client.list_artifacts(tracker.run_id, "extra")]
    assert uploaded == ["extra/notes.txt"]
