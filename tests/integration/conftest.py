"""Runs shared by the integration tests of one session.

`reference_run` is the uninterrupted 2-rank quickstart (STEPS steps, a sample ledger, MLflow on sqlite) that every
kill / signal / requeue / worker-loss test compares its resumed run with, bit for bit: the local, Ray and SLURM
launchers train the same float sums (one thread per rank, see ray_runs.run_env), so one reference made on this
machine in this session serves them all instead of a straight run per test. It also carries credentials
(SECRETS: fsspec keys that a local source ignores, a tag URL with a token) that test_secrets.py looks for in
everything the run wrote."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from testkit import shared_once
from ray_runs import REPO, SECRET_OVERRIDES, STEPS, final_weights, launch_command, quickstart_overrides, run_env

from rtrain.data.ledger import read_ledger


@dataclass(frozen=True)
class ReferenceRun:
    out: Path
    name: str

    def weights(self) -> dict[str, torch.Tensor]:
        return final_weights(self.out, self.name, STEPS)

    def ledger(self) -> dict:
        return read_ledger(self.out / self.name / "ledger")


@pytest.fixture(scope="session")
def reference_run(digits_shards, tmp_path_factory) -> ReferenceRun:
    def build(out: Path) -> None:
        cmd = launch_command(quickstart_overrides(digits_shards, out, "straight", STEPS, "dist.launcher=local",
                                                  "data.sample_ledger=true", *SECRET_OVERRIDES))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=run_env())
        (out / "console.txt").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr[-5000:]

    return ReferenceRun(shared_once(tmp_path_factory, "reference-run", build), "straight")
