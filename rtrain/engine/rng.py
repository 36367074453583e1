"""Capture and restore every global random stream a training process draws from.

The captured state holds only tensors, lists, ints, floats and None, so it round-trips through
`torch.load(weights_only=True)`; numpy's MT19937 key travels as an int64 tensor (uint32 values).
RNG state is per process: checkpoint it under `per_rank`, never `shared`.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

RNG_STATE_VERSION = 1

logger = logging.getLogger("rtrain.engine.rng")


def capture_rng_state() -> dict[str, Any]:
    python_version, python_key, python_gauss = random.getstate()
    numpy_kind, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "version": RNG_STATE_VERSION,
        "python": {"version": python_version, "key": list(python_key), "gauss_next": python_gauss},
        "numpy": {
            "kind": numpy_kind,
            "key": torch.from_numpy(numpy_key.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": [state.cpu() for state in cuda_states],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != RNG_STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__qualname__
        raise ValueError(f"rng state: version {found!r} is not the supported {RNG_STATE_VERSION}")
    missing = {"python", "numpy", "torch_cpu", "torch_cuda"} - state.keys()
    if missing:
        raise ValueError(f"rng state: missing keys {sorted(missing)}")
    python = state["python"]
    random.setstate((python["version"], tuple(python["key"]), python["gauss_next"]))
    numpy = state["numpy"]
    numpy_key = np.asarray(numpy["key"].numpy() if torch.is_tensor(numpy["key"]) else numpy["key"])
    np.random.set_state(
        (numpy["kind"], numpy_key.astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch_cpu"])
    _restore_cuda(state["torch_cuda"])


def _restore_cuda(cuda_states: list[torch.Tensor]) -> None:
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        logger.warning("rng state holds %d CUDA generators but CUDA is unavailable; not restored",
                       len(cuda_states))
        return
    device_count = torch.cuda.device_count()
    if device_count != len(cuda_states):
        logger.warning("rng state holds %d CUDA generators, this process sees %d devices; restoring %d",
                       len(cuda_states), device_count, min(device_count, len(cuda_states)))
    for device_index, cuda_state in enumerate(cuda_states[:device_count]):
        torch.cuda.set_rng_state(cuda_state, device_index)


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Fresh streams that are a pure function of (seed, step, rank): for a resume on another world size,
    where the saved per-rank streams do not map onto the new ranks."""
    derived = (seed * 1_000_003 + step * 65_537 + rank) % 2**32
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # also seeds every CUDA device


class RngStreams:
    """The process-wide random streams as a Stateful (state_dict / load_state_dict) object."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)
