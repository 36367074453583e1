"""Damaged or unfinished checkpoints are never trusted: latest() falls back, load() names the fault."""

import json
import logging
import os
import shutil

import pytest
import torch

from rtrain.checkpoint import CheckpointError, CheckpointManager


def truncate(step_dir):
    path = step_dir / "shared" / "model.pt"
    path.write_bytes(path.read_bytes()[:-100])
    return "shared/model.pt"


def flip_byte(step_dir):
    path = step_dir / "rank-00000" / "rng.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "rank-00000/rng.pt"


def flip_byte_in_meta(step_dir):
    path = step_dir / "meta.json"
    path.write_text(path.read_text().replace("7", "8"))
    return "meta.json"


def delete_file(step_dir):
    (step_dir / "shared" / "optim.pt").unlink()
    return "shared/optim.pt"


def delete_manifest(step_dir):
    (step_dir / "MANIFEST.json").unlink()
    return "MANIFEST.json"


def garble_manifest(step_dir):
    path = step_dir / "MANIFEST.json"
    path.write_text(path.read_text()[:40])
    return "MANIFEST.json"


def empty_manifest_file_list(step_dir):
    path = step_dir / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {}
    path.write_text(json.dumps(manifest))
    return "MANIFEST.json"


def future_format_version(step_dir):
    path = step_dir / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = 99
    path.write_text(json.dumps(manifest))
    return "MANIFEST.json"


def manifest_is_a_fifo(step_dir):
    """A FIFO blocks whoever opens it for reading until a writer comes: it must be refused, not opened."""
    path = step_dir / "MANIFEST.json"
    path.unlink()
    os.mkfifo(path)
    return "MANIFEST.json"


def meta_is_a_fifo(step_dir):
    path = step_dir / "meta.json"
    path.unlink()
    os.mkfifo(path)
    return "meta.json"


def state_links_to_dev_zero(step_dir):
    """A symlink to an endless file: never read through."""
    path = step_dir / "shared" / "model.pt"
    path.unlink()
    path.symlink_to("/dev/zero")
    return "shared/model.pt"


def folder_links_elsewhere(step_dir):
    """A folder of the checkpoint replaced by a symlink to a copy outside it: its files are not read."""
    outside = step_dir.parent.parent / f"outside-{step_dir.name}"
    shutil.move(step_dir / "shared", outside)
    (step_dir / "shared").symlink_to(outside)
    return "shared/"


DAMAGES = [truncate, flip_byte, flip_byte_in_meta, delete_file, delete_manifest, garble_manifest,
           empty_manifest_file_list, future_format_version, manifest_is_a_fifo, meta_is_a_fifo,
           state_links_to_dev_zero, folder_links_elsewhere]


def save_steps(manager, steps):
    for step in steps:
        manager.save(
            step,
            shared={"model": {"w": torch.full((64, 64), float(step))}, "optim": {"step": step}},
            per_rank={"rng": {"state": torch.arange(256, dtype=torch.uint8)}},
            meta={"samples_seen": 700 + step},
        )


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, damage):
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, [1, 2])
    newest = tmp_path / "step-000000002"
    bad_file = damage(newest)

    with caplog.at_level(logging.INFO, logger="rtrain.checkpoint"):
        loaded = manager.latest()

    assert loaded is not None and loaded.step == 1
    assert torch.equal(loaded.shared["model"]["w"], torch.full((64, 64), 1.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in message and bad_file in message for message in warnings), warnings
    picked = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "using" in r.getMessage()]
    assert picked and "step-000000001" in picked[0] and "step-000000002" in picked[0]


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_of_damaged_checkpoint_names_dir_and_file(tmp_path, damage):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [5])
    step_dir = tmp_path / "step-000000005"
    bad_file = damage(step_dir)
    with pytest.raises(CheckpointError) as raised:
        manager.load(step_dir)
    assert str(step_dir) in str(raised.value) and bad_file in str(raised.value)


def test_only_damaged_checkpoints_give_none(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [1, 2])
    truncate(tmp_path / "step-000000001")
    delete_manifest(tmp_path / "step-000000002")
    with caplog.at_level(logging.WARNING, logger="rtrain.checkpoint"):
        assert manager.latest() is None
    assert any("all of" in r.getMessage() for r in caplog.records)


def test_step_dir_renamed_by_hand_is_rejected(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [3])
    shutil.copytree(tmp_path / "step-000000003", tmp_path / "step-000000004")
    with pytest.raises(CheckpointError, match="says step 3"):
        manager.load(tmp_path / "step-000000004")
    assert manager.latest().step == 3


def leave_crashed_save(root, step, rank_count):
    """What a run killed mid-save leaves: a tmp dir with an old save id, parts and DONE markers."""
    tmp_dir = root / f".tmp-step-{step:09d}"
    (tmp_dir / "shared").mkdir(parents=True)
    (tmp_dir / "SAVE_ID").write_text("crashed-run")
    torch.save({"w": torch.full((4,), -1.0)}, tmp_dir / "shared" / "model.pt")
    for rank in range(rank_count):
        rank_dir = tmp_dir / f"rank-{rank:05d}"
        rank_dir.mkdir()
        torch.save({"stale": True}, rank_dir / "rng.pt")
        (rank_dir / "DONE").write_text(json.dumps({"save_id": "crashed-run", "rank": rank, "files": {}}))
    return tmp_dir


def test_leftover_tmp_dir_is_ignored_then_replaced_by_the_next_save_of_its_step(tmp_path):
    manager = CheckpointManager(tmp_path)
    save_steps(manager, [1])
    tmp_dir = leave_crashed_save(tmp_path, 2, rank_count=1)
    assert [p.name for p in manager.list()] == ["step-000000001"]
    assert manager.latest().step == 1

    manager.save(2, shared={"model": {"w": torch.full((4,), 2.0)}}, per_rank={"rng": {"fresh": True}})
    assert not tmp_dir.exists()
    loaded = manager.latest()
    assert loaded.step == 2
    assert torch.equal(loaded.shared["model"]["w"], torch.full((4,), 2.0))
    assert loaded.per_rank == {"rng": {"fresh": True}}


def test_leftover_tmp_dirs_of_older_steps_are_cleaned_on_save(tmp_path):
    manager = CheckpointManager(tmp_path)
    older = leave_crashed_save(tmp_path, 3, rank_count=1)
    newer = leave_crashed_save(tmp_path, 9, rank_count=1)
    save_steps(manager, [5])
    assert not older.exists()
    assert newer.exists()  # may belong to a later save of this timeline; left to that save
    assert manager.latest().step == 5
