"""Damaged checkpoints are evidence: a run refuses to start over them, or moves them aside; they are never
saved over, pruned or counted as kept (rtrain.checkpoint.damage). Real files, damaged on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from rtrain.checkpoint import CheckpointManager, CheckpointsDamaged


def save_steps(manager: CheckpointManager, steps) -> None:
    for step in steps:
        manager.save(step, shared={"model": {"w": torch.full((32, 32), float(step))}},
                     per_rank={"rng": {"state": torch.arange(64, dtype=torch.uint8)}}, meta={"step": step})


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


def remove_manifest(folder: Path) -> None:
    (folder / "MANIFEST.json").unlink()


def flip_model_byte(folder: Path) -> None:
    path = folder / "shared" / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (relative path -> sha256), and every empty folder: byte-for-byte identity."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("damage", [remove_manifest, flip_model_byte])
def test_all_damaged_refuses_and_touches_nothing(tmp_path, damage):
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, [2, 4])
    for step in (2, 4):
        damage(step_dir(tmp_path, step))
    before = tree_digest(tmp_path)
    with pytest.raises(CheckpointsDamaged) as raised:
        CheckpointManager(tmp_path, keep=3).resume()
    message = str(raised.value)
    assert "\n" not in message
    assert "step-000000004" in message and "step-000000002" in message and "none verifies" in message
    assert "checkpoint.on_all_damaged=restart" in message
    assert ("MANIFEST.json" if damage is remove_manifest else "shared/model.pt") in message
    assert tree_digest(tmp_path) == before


def test_all_damaged_restart_moves_them_aside_byte_for_byte(tmp_path):
    save_steps(CheckpointManager(tmp_path), [2, 4])
    remove_manifest(step_dir(tmp_path, 4))
    flip_model_byte(step_dir(tmp_path, 2))
    before = {step: tree_digest(step_dir(tmp_path, step)) for step in (2, 4)}
    manager = CheckpointManager(tmp_path)
    assert manager.resume("restart") is None
    assert manager.list() == []
    for step in (2, 4):
        moved = tmp_path / "damaged" / f"step-{step:09d}"
        assert tree_digest(moved) == before[step]
        assert moved.with_name(f"{moved.name}.reason").read_text().strip()
    save_steps(manager, [2])  # training from 0 passes step 2 again: the moved one stays as it was
    assert tree_digest(tmp_path / "damaged" / "step-000000002") == before[2]
    assert manager.latest().step == 2


def test_no_checkpoints_is_not_damage(tmp_path):
    assert CheckpointManager(tmp_path / "fresh").resume() is None


def test_newer_damaged_is_moved_aside_before_training_passes_its_step(tmp_path):
    save_steps(CheckpointManager(tmp_path, keep=5), [3, 6])
    flip_model_byte(step_dir(tmp_path, 6))
    damaged = tree_digest(step_dir(tmp_path, 6))
    manager = CheckpointManager(tmp_path, keep=5)
    assert manager.resume().step == 3
    assert tree_digest(tmp_path / "damaged" / "step-000000006") == damaged
    save_steps(manager, [4, 5, 6])
    assert tree_digest(tmp_path / "damaged" / "step-000000006") == damaged
    assert manager.latest().step == 6


def test_saving_over_a_damaged_step_moves_it_aside(tmp_path):
    """Without resume() (e.g. checkpoint.resume=never): publishing a step whose folder fails verification."""
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [5])
    remove_manifest(step_dir(tmp_path, 5))
    damaged = tree_digest(step_dir(tmp_path, 5))
    save_steps(manager, [5])
    assert tree_digest(tmp_path / "damaged" / "step-000000005") == damaged
    assert manager.latest().step == 5


def test_second_damage_of_one_step_does_not_replace_the_first(tmp_path):
    manager = CheckpointManager(tmp_path)
    for attempt in range(2):
        save_steps(manager, [5])
        remove_manifest(step_dir(tmp_path, 5))
        save_steps(manager, [5])
        flip_model_byte(step_dir(tmp_path, 5))
        assert manager.resume("restart") is None
    names = sorted(p.name for p in (tmp_path / "damaged").iterdir() if not p.name.endswith(".reason"))
    assert names == ["step-000000005", "step-000000005-2", "step-000000005-3", "step-000000005-4"]


def test_pruning_never_counts_or_deletes_damaged_ones(tmp_path):
    """keep=2 with two damaged checkpoints newer than the only verified one (left there, no resume()): a
    save keeps itself and the verified one; the damaged ones are neither deleted nor counted as kept."""
    save_steps(CheckpointManager(tmp_path, keep=10), [2, 8, 9])
    flip_model_byte(step_dir(tmp_path, 8))
    remove_manifest(step_dir(tmp_path, 9))
    damaged = {step: tree_digest(step_dir(tmp_path, step)) for step in (8, 9)}
    manager = CheckpointManager(tmp_path, keep=2)
    save_steps(manager, [3])
    assert [p.name for p in manager.list()] == ["step-000000009", "step-000000008", "step-000000003",
                                                "step-000000002"]
    assert {step: tree_digest(step_dir(tmp_path, step)) for step in (8, 9)} == damaged
    save_steps(manager, [4])  # now 2 is the oldest of this timeline beyond keep=2
    assert [p.name for p in manager.list()][2:] == ["step-000000004", "step-000000003"]
    assert manager.latest().step == 4


def test_keep_one_never_prunes_the_only_verified(tmp_path):
    save_steps(CheckpointManager(tmp_path, keep=10), [1, 7])
    remove_manifest(step_dir(tmp_path, 7))
    manager = CheckpointManager(tmp_path, keep=1)
    assert manager.resume().step == 1  # 7 is moved aside
    save_steps(manager, [2])
    assert [p.name for p in manager.list()] == ["step-000000002"]
    assert manager.latest().step == 2 and (tmp_path / "damaged" / "step-000000007").is_dir()


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="on_all_damaged"):
        CheckpointManager(tmp_path).resume("ignore")


def test_pruning_moves_an_older_damaged_one_aside_instead_of_keeping_it(tmp_path):
    """Older checkpoints get the cheap checks (manifest, sizes) when pruning: a damaged one is not counted
    towards keep (the verified ones are kept in its place) and is moved aside, not deleted."""
    save_steps(CheckpointManager(tmp_path, keep=10), [1, 2, 3])
    remove_manifest(step_dir(tmp_path, 2))
    damaged = tree_digest(step_dir(tmp_path, 2))
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, [4])
    assert [p.name for p in manager.list()] == ["step-000000004", "step-000000003", "step-000000001"]
    assert tree_digest(tmp_path / "damaged" / "step-000000002") == damaged
