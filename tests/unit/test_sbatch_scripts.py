"""The shipped sbatch scripts parse as bash and ask SLURM for what preemption needs (the runs themselves are
in tests/integration/test_slurm.py, against real SLURM daemons)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "cluster" / "slurm").glob("*.sbatch"))


def test_both_scripts_ship():
    assert [p.name for p in SCRIPTS] == ["rtrain-srun.sbatch", "rtrain.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_asks_for_requeue_and_a_warning_signal(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives
    assert any(d.startswith("#SBATCH --signal=B:USR1@") for d in directives)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_without_a_recipe_prints_usage_and_exits_2(script):
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: sbatch")
