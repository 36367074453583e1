"""The cross-rank save protocol, with each rank's manager in its own thread on one shared directory."""

import json
import logging
import threading
import time

import pytest
import torch

from rtrain.checkpoint import CheckpointError, CheckpointManager


def run_ranks(targets):
    """Run one callable per rank in threads; re-raise the first failure."""
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - handed back to the test thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    if errors:
        raise errors[0]


def rank_states(rank, step):
    return {"rng": {"seed": torch.tensor([rank, step])}, "loader": {"rank": rank, "step": step}}


@pytest.mark.parametrize("async_save", [False, True])
def test_every_rank_saves_its_part_and_loads_its_own(tmp_path, async_save):
    world_size = 3
    managers = [CheckpointManager(tmp_path, keep=2, rank=r, world_size=world_size, async_save=async_save,
                                  finalize_timeout_s=30) for r in range(world_size)]

    def rank_loop(manager):
        def run():
            for step in (10, 20, 30):
                manager.save(step, shared={"model": {"w": torch.full((5,), float(step))}},
                             per_rank=rank_states(manager.rank, step), meta={"step": step})
            manager.close()
        return run

    run_ranks([rank_loop(manager) for manager in managers])

    assert [p.name for p in managers[0].list()] == ["step-000000030", "step-000000020"]
    for manager in managers:
        loaded = manager.latest()
        assert loaded.step == 30 and loaded.world_size == world_size
        assert torch.equal(loaded.shared["model"]["w"], torch.full((5,), 30.0))
        assert loaded.per_rank["loader"] == {"rank": manager.rank, "step": 30}
        assert torch.equal(loaded.per_rank["rng"]["seed"], torch.tensor([manager.rank, 30]))
        assert loaded.meta == {"step": 30}
    manifest = json.loads((tmp_path / "step-000000030" / "MANIFEST.json").read_text())
    assert {f"rank-{r:05d}/loader.pt" for r in range(world_size)} <= set(manifest["files"])


def wait_for(condition, timeout_s=30):
    """Poll a filesystem condition that may raise while files are being swapped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError("condition not reached")


class HeldPublisher(CheckpointManager):
    """Rank 0 that holds back the final rename until the test releases it."""

    def __init__(self, *args, release, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = release

    def _publish(self, tmp_dir, final_dir):
        assert self.release.wait(timeout=30)
        super()._publish(tmp_dir, final_dir)


def test_a_follower_returns_only_after_the_checkpoint_is_published(tmp_path):
    release = threading.Event()
    leader = HeldPublisher(tmp_path, rank=0, world_size=2, finalize_timeout_s=30, release=release)
    follower = CheckpointManager(tmp_path, rank=1, world_size=2, finalize_timeout_s=30)
    follower_thread = threading.Thread(target=follower.save, args=(5, {}, {"rng": {"r": 1}}))
    leader_thread = threading.Thread(target=leader.save, args=(5, {"model": {"x": 1}}, {"rng": {"r": 0}}))
    follower_thread.start()
    leader_thread.start()
    wait_for(lambda: (tmp_path / ".tmp-step-000000005" / "MANIFEST.json").exists())
    follower_thread.join(timeout=0.5)
    still_waiting = follower_thread.is_alive()
    release.set()
    follower_thread.join(timeout=30)
    leader_thread.join(timeout=30)
    assert still_waiting, "rank 1 returned from save() before step-000000005 existed"
    loaded = follower.latest()
    assert loaded.step == 5 and loaded.per_rank == {"rng": {"r": 1}}


def test_markers_left_by_a_crashed_save_never_count(tmp_path, caplog):
    """Rank 1 reads the crashed run's SAVE_ID and finishes its part before rank 0 arrives."""
    stale = tmp_path / ".tmp-step-000000007"
    for rank in (0, 1):
        (stale / f"rank-{rank:05d}").mkdir(parents=True)
        (stale / f"rank-{rank:05d}" / "DONE").write_text(json.dumps({"save_id": "old", "files": {}}))
    (stale / "SAVE_ID").write_text("old")
    follower = CheckpointManager(tmp_path, rank=1, world_size=2, finalize_timeout_s=30)
    leader = CheckpointManager(tmp_path, rank=0, world_size=2, finalize_timeout_s=30)

    def lead():
        marker = stale / "rank-00001" / "DONE"
        wait_for(lambda: json.loads(marker.read_text()).get("rank") == 1)  # rank 1 re-marked under "old"
        leader.save(7, shared={"model": {"fresh": True}}, per_rank={"rng": {"r": 0}})

    with caplog.at_level(logging.INFO, logger="rtrain.checkpoint"):
        run_ranks([lambda: follower.save(7, shared={}, per_rank={"rng": {"fresh": 1}}), lead])
    assert any("rank 1" in r.getMessage() and "rewriting" in r.getMessage() for r in caplog.records)
    loaded_by_follower = follower.latest()
    assert loaded_by_follower.step == 7
    assert loaded_by_follower.per_rank == {"rng": {"fresh": 1}}
    assert leader.latest().shared == {"model": {"fresh": True}}


def test_leader_times_out_naming_ranks_that_never_saved(tmp_path):
    leader = CheckpointManager(tmp_path, rank=0, world_size=3, finalize_timeout_s=0.3)
    with pytest.raises(CheckpointError, match=r"ranks \[1, 2\] did not finish writing"):
        leader.save(1, shared={"model": {}})
    assert leader.list() == []


def test_follower_times_out_when_rank_0_never_saves(tmp_path):
    follower = CheckpointManager(tmp_path, rank=1, world_size=2, finalize_timeout_s=0.3)
    with pytest.raises(CheckpointError, match=r"\.tmp-step-000000001: rank 1 waited"):
        follower.save(1, shared={}, per_rank={"rng": {}})


def test_follower_ignores_shared_and_meta(tmp_path):
    managers = [CheckpointManager(tmp_path, rank=r, world_size=2, finalize_timeout_s=30) for r in (0, 1)]
    run_ranks([
        lambda: managers[0].save(1, shared={"model": {"from": 0}}, meta={"by": 0}),
        lambda: managers[1].save(1, shared={"model": {"from": 1}, "extra": {}}, meta={"by": 1}),
    ])
    loaded = managers[1].latest()
    assert loaded.shared == {"model": {"from": 0}} and loaded.meta == {"by": 0}
