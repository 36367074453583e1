"""Checkpoints damaged on disk for real, then a real 2-rank quickstart launch (`python -m rtrain.launch`, local
launcher, gloo): by default the run refuses to start and leaves every byte where it was; with
`checkpoint.on_all_damaged=restart` it trains from step 0 with the damaged folders moved to damaged/."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rtrain.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 4

pytestmark = [pytest.mark.integration]


def _command(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rtrain.launch", "recipes/quickstart.yaml", f"data.source={shards}",
            f"run.output_root={out}", "run.name=r", "dist.launcher=local", f"train.max_steps={MAX_STEPS}",
            "checkpoint.every_steps=2", "checkpoint.keep=10", "tracking.enabled=false", "eval.every_epochs=100",
            *extra]


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _remove_manifests(ckpt_dir: Path) -> None:
    for step_dir in ckpt_dir.glob("step-*"):
        (step_dir / "MANIFEST.json").unlink()


def _flip_model_bytes(ckpt_dir: Path) -> None:
    for model in ckpt_dir.glob("step-*/shared/model.pt"):
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> Path:
    """A finished run with verified checkpoints at steps 2 and 4 (copied by each test before damaging)."""
    out = tmp_path_factory.mktemp("trained")
    proc = _launch(_command(digits_shards, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (out / "r" / "checkpoints").glob("step-*")) == ["step-000000002",
                                                                                "step-000000004"]
    return out


def _damaged_copy(trained: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    ckpt_dir = out / "r" / "checkpoints"
    damage(ckpt_dir)
    return out, ckpt_dir


@pytest.mark.parametrize("damage", [_remove_manifests, _flip_model_bytes])
def test_all_damaged_refuses_and_leaves_them_byte_for_byte(digits_shards, trained, tmp_path, damage):
    out, ckpt_dir = _damaged_copy(trained, tmp_path, damage)
    before = _tree(ckpt_dir)
    proc = _launch(_command(digits_shards, out))
    assert proc.returncode == 1, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rtrain: rank ") and " failed: CheckpointsDamaged: " in last, proc.stderr[-3000:]
    assert f"{ckpt_dir}: 2 checkpoint(s), none verifies" in last
    assert "step-000000004" in last and "step-000000002" in last
    assert "checkpoint.on_all_damaged=restart" in last
    for step in ("step-000000002", "step-000000004"):  # one line per damaged checkpoint before it, naming why
        assert any(step in line and "skipping damaged checkpoint" in line for line in proc.stderr.splitlines())
    assert _tree(ckpt_dir) == before


def test_all_damaged_restart_trains_from_zero_and_moves_them_aside(digits_shards, trained, tmp_path):
    out, ckpt_dir = _damaged_copy(trained, tmp_path, _flip_model_bytes)
    before = {step_dir.name: _tree(step_dir) for step_dir in ckpt_dir.glob("step-*")}
    proc = _launch(_command(digits_shards, out, "checkpoint.on_all_damaged=restart"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" not in proc.stderr
    assert '"step": 4' in proc.stdout
    for name, tree in before.items():
        assert _tree(ckpt_dir / "damaged" / name) == tree
        assert (ckpt_dir / "damaged" / f"{name}.reason").read_text().strip()
    loaded = CheckpointManager(ckpt_dir, world_size=2).latest()
    assert loaded is not None and loaded.step == MAX_STEPS
