"""Checkpoints know whose they are, for real: the session's reference run (a copy of it) is launched again with
model.name, optim.name or data.source changed. Each launch is refused in one line listing the key, before
anything is loaded or written: every file of the run directory (checkpoints, resolved_recipe.yaml, the MLflow
store) byte-identical after. With checkpoint.allow_changes naming the key, the launch resumes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from ray_runs import REPO, STEPS, launch_command, quickstart_overrides, run_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".owner.lock"}


def test_a_checkpoint_of_another_identity_is_refused_before_anything_is_written(reference_run, digits_shards,
                                                                               tmp_path):
    out = tmp_path / "ref"
    shutil.copytree(reference_run.out, out)
    moved = tmp_path / "moved-shards"
    shutil.copytree(digits_shards, moved)
    base = quickstart_overrides(digits_shards, out, reference_run.name, STEPS, "dist.launcher=local",
                                "data.sample_ledger=true", "tracking.enabled=false")
    before = _files(out)
    for change, key, old, new in (("model.name=cifar_plain20", "model.name", "cifar_resnet20", "cifar_plain20"),
                                  ("optim.name=lars", "optim.name", "sgd", "lars"),
                                  (f"data.source={moved}", "data.source", str(digits_shards), str(moved))):
        done = subprocess.run(launch_command([*base, change]), cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=run_env())
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"rtrain: checkpoint {out / reference_run.name / 'checkpoints'}/step-") \
            and f"belongs to another run identity ({key} {old!r} -> {new!r})" in last, last
        assert f"checkpoint.allow_changes=[{key}]" in last and "Traceback" not in done.stderr
        assert _files(out) == before, change

    allowed = subprocess.run(launch_command([*base, "model.name=cifar_plain20",
                                             "checkpoint.allow_changes=[model.name]"]),
                             cwd=REPO, capture_output=True, text=True, timeout=600, env=run_env())
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resumed from" in allowed.stderr and "model cifar_plain20" in allowed.stderr
