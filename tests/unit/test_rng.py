"""RNG capture/restore: the next random numbers after restore equal those after capture."""

import random

import numpy as np
import pytest
import torch

from rtrain.checkpoint import CheckpointManager
from rtrain.checkpoint.snapshot import snapshot_state
from rtrain.engine.rng import RNG_STATE_VERSION, RngStreams, capture_rng_state, restore_rng_state


def draw_from_every_stream():
    return {
        "python": [random.random() for _ in range(5)] + [random.gauss(0, 1)],
        "numpy": np.concatenate([np.random.rand(5), np.random.standard_normal(3)]).tolist(),
        "torch": torch.cat([torch.rand(5), torch.randn(3), torch.randint(0, 1000, (4,)).float()]).tolist(),
    }


def advance_every_stream():
    # leave cached gaussians behind: both python and numpy keep one between calls
    random.gauss(0, 1)
    np.random.standard_normal(1)
    torch.randn(7)


def test_restore_replays_the_same_random_numbers():
    advance_every_stream()
    state = capture_rng_state()
    expected = draw_from_every_stream()
    draw_from_every_stream()  # move on, as training would
    restore_rng_state(state)
    assert draw_from_every_stream() == expected


def test_state_dict_round_trip_through_a_weights_only_checkpoint(tmp_path):
    streams = RngStreams()
    advance_every_stream()
    manager = CheckpointManager(tmp_path)
    manager.save(1, shared={}, per_rank={"rng": streams.state_dict()})
    expected = draw_from_every_stream()

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    streams.load_state_dict(manager.latest().per_rank["rng"])
    assert draw_from_every_stream() == expected


def test_captured_state_is_weights_only_safe_and_versioned():
    state = capture_rng_state()
    assert state["version"] == RNG_STATE_VERSION
    snapshot_state(state, "rng")  # raises on anything torch.load could not read


def test_capture_does_not_disturb_the_streams():
    state = capture_rng_state()
    first = draw_from_every_stream()
    restore_rng_state(state)
    capture_rng_state()
    assert draw_from_every_stream() == first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_replay_after_restore():
    torch.cuda.manual_seed_all(5)
    torch.rand(3, device="cuda")
    state = capture_rng_state()
    assert len(state["torch_cuda"]) == torch.cuda.device_count()
    expected = torch.randn(8, device="cuda").cpu()
    torch.randn(100, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.randn(8, device="cuda").cpu(), expected)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"version": 99}, "version 99"),
        ([1, 2], "version 'list'"),
        ({"version": RNG_STATE_VERSION, "python": {}}, "missing keys"),
    ],
)
def test_bad_state_is_refused(state, message):
    with pytest.raises(ValueError, match=message):
        restore_rng_state(state)
