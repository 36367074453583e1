"""async_save=True writes exactly what sync saving writes, from a snapshot taken when save() is called."""

from collections import OrderedDict

import pytest
import torch

from rtrain.checkpoint import CheckpointError, CheckpointManager


def training_state(seed):
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 8, 8, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def assert_states_equal(actual, expected):
    assert type(actual) is type(expected) or isinstance(expected, torch.Tensor)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_states_equal(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected):
            assert_states_equal(got, want)
    else:
        assert actual == expected


def test_async_save_writes_the_same_content_as_sync_save(tmp_path):
    model, optimizer = training_state(seed=0)
    shared = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    per_rank = {"loader": {"epoch": 1, "offsets": [3, 4]}}
    meta = {"run_id": "r1"}
    with CheckpointManager(tmp_path / "sync") as sync_manager, \
            CheckpointManager(tmp_path / "async", async_save=True) as async_manager:
        sync_manager.save(4, shared, per_rank, meta)
        async_manager.save(4, shared, per_rank, meta)
        async_manager.wait()
        from_sync, from_async = sync_manager.latest(), async_manager.latest()
    assert from_async.step == from_sync.step == 4
    assert_states_equal(from_async.shared, from_sync.shared)
    assert_states_equal(from_async.shared["model"], model.state_dict())
    assert from_async.per_rank == from_sync.per_rank == per_rank
    assert from_async.meta == from_sync.meta == meta


def test_mutating_tensors_after_async_save_does_not_leak_into_the_checkpoint(tmp_path):
    model, optimizer = training_state(seed=1)
    before = {"model": OrderedDict((k, v.clone()) for k, v in model.state_dict().items()),
              "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]}
    groups = [{"lr": 0.1}]
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, shared={"model": model.state_dict(), "optim": {"groups": groups},
                            "momentum": [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]})
    with torch.no_grad():  # training carries on while the background thread writes
        for tensor in list(model.state_dict().values()):
            tensor.add_(1)
        for param in model.parameters():
            optimizer.state[param]["momentum_buffer"].mul_(-3)
    groups[0]["lr"] = 99.0
    groups.append({"lr": 5.0})
    manager.wait()
    loaded = manager.latest()
    assert_states_equal(loaded.shared["model"], before["model"])
    assert_states_equal(loaded.shared["momentum"], before["momentum"])
    assert loaded.shared["optim"] == {"groups": [{"lr": 0.1}]}


def test_consecutive_async_saves_each_complete_and_prune(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, async_save=True)
    weights = torch.zeros(1000)
    for step in range(1, 6):
        weights.add_(1)
        manager.save(step, shared={"model": {"w": weights}})
    manager.wait()
    assert [p.name for p in manager.list()] == ["step-000000005", "step-000000004"]
    assert torch.equal(manager.latest().shared["model"]["w"], torch.full((1000,), 5.0))
    assert torch.equal(manager.load(tmp_path / "step-000000004").shared["model"]["w"], torch.full((1000,), 4.0))


def test_async_snapshots_follow_changing_shapes_dtypes_and_keys(tmp_path):
    manager = CheckpointManager(tmp_path, keep=None, async_save=True)
    states = [
        {"a": torch.ones(4), "b": torch.zeros(2, 2)},
        {"a": torch.ones(2, 3, dtype=torch.float16), "c": torch.arange(3)},
        {"a": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), "c": torch.arange(3)[1:]},
        {"a": torch.randn(4, 6)[:, ::2], "c": torch.randn(3, dtype=torch.complex64).conj(), "e": torch.empty(0)},
    ]
    for step, state in enumerate(states):
        manager.save(step, shared={"model": state})
    manager.close()
    for step, state in enumerate(states):
        saved = manager.load(tmp_path / f"step-{step:09d}").shared["model"]
        assert_states_equal(saved, state)
        assert all(saved[key].stride() == state[key].stride() for key in state if state[key].is_contiguous()
                   or state[key].is_contiguous(memory_format=torch.channels_last))


def test_background_failure_surfaces_on_wait_and_then_clears(tmp_path):
    # rank 0 of a 2-rank job whose rank 1 never saves: finalisation times out in the background
    manager = CheckpointManager(tmp_path, rank=0, world_size=2, async_save=True, finalize_timeout_s=0.3)
    manager.save(1, shared={"model": {"w": torch.ones(2)}})
    with pytest.raises(CheckpointError, match=r"ranks \[1\] did not finish"):
        manager.wait()
    manager.wait()  # the error was delivered once
    assert manager.list() == []


def test_background_failure_surfaces_on_the_next_save(tmp_path):
    manager = CheckpointManager(tmp_path, rank=0, world_size=2, async_save=True, finalize_timeout_s=0.3)
    manager.save(1, shared={"model": {}})
    with pytest.raises(CheckpointError, match="step-000000001"):
        manager.save(2, shared={"model": {}})
    manager.close()


def test_save_records_how_long_it_blocked_the_caller(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, shared={"model": {"w": torch.ones(10)}})
    blocked = manager.last_save_blocking_s
    manager.close()
    assert blocked > 0
