"""rtrain as a stranger gets it: a wheel built from this checkout, installed into a fresh virtual environment in a
temp folder and run from there, with no checkout on the path. It lists and validates the packaged recipes by
name, finds its SLURM scripts, generates a dataset and trains the quickstart's first steps.

The wheel is installed without its dependencies (this machine has no network for them): the fresh environment
sees the test environment's site-packages through a plain path entry, which adds torch and the rest but not the
checkout (the editable install's import hook lives in a .pth file there, which a path entry does not run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The fresh environment's bin/ with rtrain installed from its wheel."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(REPO)], check=True, cwd=root, capture_output=True, timeout=300)
    [wheel] = (root / "dist").glob("rtrain-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "venv" / "bin"


def _run(bin_dir: Path, cwd: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_stands_alone(installed, tmp_path, digits_shards):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(installed, work, "python", "-c", "import rtrain, data_prep, cluster; "
                 "print(rtrain.__file__, data_prep.__file__, cluster.__file__)")
    assert where.returncode == 0, where.stderr
    assert str(REPO) not in where.stdout and str(installed.parent) in where.stdout

    version = _run(installed, work, "rtrain", "--version")
    assert version.returncode == 0 and version.stdout.startswith("rtrain 0."), version
    recipes = _run(installed, work, "rtrain", "recipes", "--format", "json")
    listed = {r["name"]: r["path"] for r in json.loads(recipes.stdout)}
    assert {"quickstart", "r152_256gpu", "degradation/resnet56"} <= set(listed)
    assert all(path.startswith(str(installed.parent)) for path in listed.values())
    files = _run(installed, work, "python", "-m", "cluster", "files").stdout.split()
    assert {Path(f).name for f in files} >= {"rtrain.sbatch", "rtrain-srun.sbatch", "r152_256gpu.cluster.yaml"}

    checked = _run(installed, work, "rtrain", "validate", "quickstart", f"data.source={digits_shards}")
    assert checked.returncode == 0, checked.stderr
    assert list(work.iterdir()) == []  # validate creates nothing, not even the output root or the database

    folders = _run(installed, work, "python", "-m", "data_prep.samples", "digits", "--out", "digits")
    assert folders.returncode == 0, folders.stderr
    assert len(list((work / "digits" / "train").iterdir())) == 10  # one folder per class

    run = _run(installed, work, "rtrain", "launch", "quickstart", f"data.source={digits_shards}",
               "dist.launcher=local", "train.max_steps=3", "eval.every_epochs=100", "tracking.enabled=false")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3
    assert summary["checkpoint"].startswith(str(work)) and Path(summary["checkpoint"]).is_dir()  # made here
