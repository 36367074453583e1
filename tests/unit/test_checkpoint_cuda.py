"""CUDA tensors: snapshots land on the host (pinned, reused buffers for async) and load back on CPU."""

import pytest
import torch

from rtrain.checkpoint import CheckpointManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_training_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16)).cuda()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("async_save", [False, True])
def test_cuda_state_saves_and_loads_onto_cpu(tmp_path, async_save):
    model, optimizer = cuda_training_state()
    expected = {key: value.cpu() for key, value in model.state_dict().items()}
    manager = CheckpointManager(tmp_path, async_save=async_save)
    manager.save(1, shared={"model": model.state_dict(), "optim": optimizer.state_dict()})
    with torch.no_grad():
        for value in model.state_dict().values():
            value.add_(1)  # training goes on; a queued kernel must not reach the snapshot
    manager.close()
    loaded = manager.latest().shared
    for key, value in expected.items():
        assert loaded["model"][key].device.type == "cpu"
        assert torch.equal(loaded["model"][key], value), key
    momentum = [state["momentum_buffer"] for state in loaded["optim"]["state"].values()]
    assert momentum and all(buffer.device.type == "cpu" for buffer in momentum)


def test_repeated_async_saves_of_cuda_state_keep_each_step(tmp_path):
    weights = torch.zeros(1 << 20, device="cuda")
    manager = CheckpointManager(tmp_path, keep=None, async_save=True)
    for step in range(1, 4):
        weights.fill_(step)
        manager.save(step, shared={"model": {"w": weights}})
    manager.close()
    for step in range(1, 4):
        saved = manager.load(tmp_path / f"step-{step:09d}").shared["model"]["w"]
        assert torch.equal(saved, torch.full((1 << 20,), float(step)))
