"""Snapshots of training state for a checkpoint: copies that training may not mutate, checked to be
loadable with torch.load(weights_only=True) (tensors, containers, scalars) before anything is written,
so a value that would not load back is refused at save time with the key path that holds it."""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

import torch

from rtrain._safe_state import SAFE_OPAQUE_TYPES, SAFE_SCALAR_TYPES, StateWalk
from rtrain.checkpoint.files import CheckpointError, UnsafeStateError

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class SnapshotBuffers:
    """CPU copies of tensors, kept from one async save to the next and refilled in place.

    Refilling avoids re-faulting fresh pages on every save, and for CUDA tensors keeps pinned host
    memory, so device-to-host copies run asynchronously at full speed (one synchronize at the end).
    A buffer is only refilled after the previous save finished writing it: CheckpointManager.save()
    waits for the previous save before snapshotting.
    """

    def __init__(self) -> None:
        self._by_path: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._copies_in_flight = False

    def copy_of(self, tensor: torch.Tensor, where: str) -> torch.Tensor:
        if not _is_dense(tensor):
            return tensor.to("cpu", copy=True) if tensor.device.type != "cpu" else tensor.clone()
        buffer = self._by_path.get(where)
        if buffer is None or buffer.dtype != tensor.dtype or buffer.shape != tensor.shape or (
            buffer.stride() != tensor.stride()
        ):
            buffer = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu",
                                         pin_memory=tensor.device.type == "cuda")
            self._by_path[where] = buffer
        if tensor.device.type == "cpu" and tensor.numel():
            # one plain memcpy: dense with equal strides means identical byte layout, and unlike
            # copy_() it cannot stall on busy intra-op threads (7x slower on a loaded 2-core host)
            ctypes.memmove(buffer.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size())
        elif tensor.device.type == "cuda":
            buffer.copy_(tensor, non_blocking=True)
            self._copies_in_flight = True
        self._used.add(where)
        return buffer

    def finish(self) -> None:
        """Wait for in-flight device copies and drop buffers this snapshot no longer needs."""
        if self._copies_in_flight:
            torch.cuda.synchronize()
            self._copies_in_flight = False
        for stale in self._by_path.keys() - self._used:
            del self._by_path[stale]
        self._used.clear()


def _is_dense(tensor: torch.Tensor) -> bool:
    """Strided with no gaps (contiguous, channels_last, ...): a same-strided buffer holds it exactly."""
    if tensor.layout != torch.strided or tensor.device.type not in ("cpu", "cuda"):
        return False
    if tensor.is_quantized or tensor.is_conj() or tensor.is_neg():  # bytes differ from the values
        return False
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def snapshot_state(value: Any, where: str, buffers: SnapshotBuffers | None = None) -> Any:
    """Return `value` with every tensor on CPU, refusing anything weights_only loads cannot read.

    With `buffers`, every tensor is copied (into buffers reused across saves), so the caller may
    mutate the originals while a background thread writes the snapshot. Without, CPU tensors are
    shared unless they are views into a larger storage (torch.save would write the whole storage).
    """
    walk = StateWalk(functools.partial(_snapshot_leaf, buffers=buffers), check_key=_check_key)
    return walk(value, where)


def _snapshot_leaf(value: Any, where: str, buffers: SnapshotBuffers | None) -> Any:
    value_type = type(value)
    if value_type in SAFE_SCALAR_TYPES or isinstance(value, SAFE_OPAQUE_TYPES):
        return value
    if isinstance(value, torch.Tensor):
        return _snapshot_tensor(value, where, buffers)
    raise UnsafeStateError(
        f"{where}: {value_type.__module__}.{value_type.__qualname__} cannot be stored in a "
        "checkpoint (torch.load(weights_only=True) only reads tensors, dicts, lists, tuples, sets, "
        "None/bool/int/float/complex/str/bytes, torch.dtype/device/Size); convert it, e.g. a numpy "
        "array with torch.from_numpy(...) or .tolist(), an enum with .value"
    )


def _check_key(key: Any, where: str) -> None:
    if type(key) in SAFE_SCALAR_TYPES and type(key) is not bytearray:
        return
    if type(key) is tuple:
        for part in key:
            _check_key(part, where)
        return
    raise UnsafeStateError(
        f"{where}: key {key!r} of type {type(key).__qualname__} cannot be stored in a checkpoint "
        "(use str/int/float/bool/None or tuples of them)"
    )


def _snapshot_tensor(tensor: torch.Tensor, where: str, buffers: SnapshotBuffers | None) -> torch.Tensor:
    if type(tensor) not in _PLAIN_TENSOR_TYPES:
        raise UnsafeStateError(
            f"{where}: tensor subclass {type(tensor).__qualname__} cannot be stored in a checkpoint; "
            "store a plain tensor (e.g. .full_tensor() / .to_local() / torch.Tensor(x))"
        )
    if tensor.device.type == "meta":
        raise UnsafeStateError(f"{where}: tensor is on the meta device and holds no data")
    plain = tensor.detach()
    if buffers is not None:
        return buffers.copy_of(plain, where)
    if plain.device.type != "cpu":
        return plain.to("cpu", copy=True)
    if not _is_dense(plain) or plain.untyped_storage().nbytes() > plain.numel() * plain.element_size():
        return plain.clone()  # a view: torch.save would write its whole storage
    return plain


def check_json_state(value: Any, where: str) -> None:
    """meta.json must be plain JSON; name the key path of the first value that is not."""
    if value is None or type(value) in (bool, int, str) or (type(value) is float and math.isfinite(value)):
        return
    if type(value) is dict and all(type(key) is str for key in value):
        for key, item in value.items():
            check_json_state(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_json_state(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where}: {value!r:.80} ({type(value).__qualname__}) is not plain JSON (str keys, finite numbers)"
    )
