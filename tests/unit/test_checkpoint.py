"""CheckpointManager: round trips, layout, keep-k pruning and refusal of unsafe values."""

import enum
import hashlib
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from rtrain.checkpoint import CheckpointError, CheckpointManager, UnsafeStateError


def nested_state():
    return {
        "weights": OrderedDict(
            (str(dtype), (torch.arange(12) % 5).to(dtype).reshape(3, 4))
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                          torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64)
        ),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "scalar_tensor": torch.tensor(3.5),
        "groups": [{"lr": 0.1, "params": [0, 1, 2], "nesterov": True}, {"lr": None, "betas": (0.9, 0.99)}],
        "counts": {0: 7, 1: 9},
        "text": "resnet152",
        "blob": b"\x00\x01\xff",
        "shape": torch.Size([3, 4]),
        "dtype": torch.bfloat16,
        "labels": {"a", "b"},
        "big_int": 2**62,
        "nothing": None,
    }


def assert_same_state(actual, expected, where="state"):
    assert type(actual) is type(expected) or (
        isinstance(expected, torch.Tensor) and type(actual) in (torch.Tensor, torch.nn.Parameter)
    ), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape, where
        assert actual.stride() == expected.stride(), where
        assert torch.equal(actual, expected.detach()), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (got, want) in enumerate(zip(actual, expected)):
            assert_same_state(got, want, f"{where}[{index}]")
    else:
        assert actual == expected, where


def test_round_trip_of_nested_states_with_many_dtypes(tmp_path):
    state = nested_state()
    rank_state = {"position": {"epoch": 2, "shard": 5}, "seed": torch.tensor([1, 2, 3])}
    meta = {"recipe": "model: resnet152\n", "run_id": "abc", "samples_seen": 1024}
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(10, shared={"model": state, "optim": {"step": 3}}, per_rank={"loader": rank_state}, meta=meta)

    loaded = manager.latest()
    assert loaded is not None
    assert loaded.step == 10
    assert loaded.path == tmp_path / "ckpt" / "step-000000010"
    assert set(loaded.shared) == {"model", "optim"}
    assert_same_state(loaded.shared["model"], state)
    assert loaded.shared["optim"] == {"step": 3}
    assert_same_state(loaded.per_rank["loader"], rank_state)
    assert loaded.meta == meta
    assert loaded.world_size == 1
    assert_same_state(manager.load(loaded.path).shared["model"], state)


def test_layout_and_manifest_cover_every_file(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(7, shared={"model": {"w": torch.ones(4)}}, per_rank={"rng": {"s": 1}}, meta={"epoch": 1})
    step_dir = tmp_path / "step-000000007"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000007"]
    for relative in ("shared/model.pt", "rank-00000/rng.pt", "rank-00000/DONE", "meta.json", "MANIFEST.json"):
        assert (step_dir / relative).is_file(), relative
    manifest = json.loads((step_dir / "MANIFEST.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1 and manifest["version"] == 1
    assert set(manifest["files"]) == {"shared/model.pt", "rank-00000/rng.pt", "rank-00000/DONE", "meta.json"}
    for name, entry in manifest["files"].items():
        data = (step_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((step_dir / "meta.json").read_text()) == {"epoch": 1}


def test_keep_k_prunes_the_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4, 5):
        manager.save(step, shared={"model": {"w": torch.full((3,), float(step))}})
    assert [p.name for p in manager.list()] == ["step-000000005", "step-000000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000005"]
    assert torch.equal(manager.latest().shared["model"]["w"], torch.full((3,), 5.0))


def test_keep_none_keeps_every_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=None)
    for step in range(5):
        manager.save(step, shared={"model": {"step": step}})
    assert [p.name for p in manager.list()] == [f"step-{s:09d}" for s in (4, 3, 2, 1, 0)]


def test_resaving_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(3, shared={"model": {"w": torch.zeros(2)}})
    manager.save(3, shared={"model": {"w": torch.ones(2)}})
    assert [p.name for p in manager.list()] == ["step-000000003"]
    assert torch.equal(manager.latest().shared["model"]["w"], torch.ones(2))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_list_ignores_tmp_dirs_and_foreign_entries(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(2, shared={"model": {}})
    (tmp_path / ".tmp-step-000000009").mkdir()
    (tmp_path / "step-12").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in manager.list()] == ["step-000000002"]
    assert manager.latest().step == 2


def test_empty_root_has_no_latest(tmp_path):
    assert CheckpointManager(tmp_path / "fresh").latest() is None


def test_a_view_stores_only_its_own_elements(tmp_path):
    big = torch.zeros(1_000_000)
    manager = CheckpointManager(tmp_path)
    manager.save(1, shared={"model": {"head": big[:10]}})
    assert (tmp_path / "step-000000001" / "shared" / "model.pt").stat().st_size < 100_000
    assert torch.equal(manager.latest().shared["model"]["head"], torch.zeros(10))


def test_load_of_missing_dir_names_it(tmp_path):
    with pytest.raises(CheckpointError, match="step-000000042"):
        CheckpointManager(tmp_path).load(tmp_path / "step-000000042")


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("shared", "per_rank", "where"),
    [
        ({"model": {"w": np.zeros(3)}}, None, r"shared\['model'\]\['w'\]: numpy.ndarray"),
        ({"model": {"lr": np.float64(0.1)}}, None, r"shared\['model'\]\['lr'\]: numpy.float64"),
        ({"model": {"groups": [{"mode": Color.RED}]}}, None, r"shared\['model'\]\['groups'\]\[0\]\['mode'\]"),
        ({"model": {}}, {"loader": {"it": iter([1])}}, r"per_rank\['loader'\]\['it'\]"),
        ({"model": {object(): 1}}, None, r"shared\['model'\]: key"),
        ({"model": lambda: 0}, None, r"shared\['model'\]: builtins.function"),
    ],
)
def test_values_weights_only_cannot_load_are_refused_with_their_key_path(tmp_path, shared, per_rank, where):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(UnsafeStateError, match=where):
        manager.save(1, shared=shared, per_rank=per_rank)
    assert manager.list() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shared": {"../evil": {}}}, "'../evil' is not usable as a file name"),
        ({"shared": {"model": {}}, "meta": {"run": {"started": object()}}}, r"meta\['run'\]\['started'\]"),
        ({"shared": {"model": {}}, "meta": {"loss": float("nan")}}, r"meta\['loss'\]: nan"),
        ({"shared": [("model", {})]}, "shared must be a dict"),
    ],
)
def test_bad_names_and_meta_are_refused(tmp_path, kwargs, message):
    with pytest.raises(CheckpointError, match=message):
        CheckpointManager(tmp_path).save(1, **kwargs)


def test_bad_step_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="step must be an int"):
        CheckpointManager(tmp_path).save(-1, shared={})


@pytest.mark.parametrize(
    "kwargs", [{"keep": 0}, {"rank": 2, "world_size": 2}, {"world_size": 0}, {"finalize_timeout_s": 0}]
)
def test_bad_constructor_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match="CheckpointManager"):
        CheckpointManager(tmp_path, **kwargs)
