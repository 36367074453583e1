"""What `torch.load(weights_only=True)` can read back, and the one walk that rebuilds a state tree to fit.

Two places turn training state into something such a load reads back: checkpoint snapshots
(rtrain.checkpoint.snapshot, which refuses anything else) and DeepSpeed's optimizer states
(rtrain.distributed.deepspeed_backend, which converts what it can). Both rebuild the tree container by
container with StateWalk and decide about every other value in their own `leaf`. Imports torch only,
so every layer of rtrain may use it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Exact types (not isinstance): numpy scalars subclass float/int but do not survive weights_only loads.
SAFE_SCALAR_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray)
SAFE_OPAQUE_TYPES = (torch.dtype, torch.device, torch.Size)

Leaf = Callable[[Any, str], Any]  # (value, where) -> the value to store; raises to refuse it
KeyCheck = Callable[[Any, str], None]  # (key, where of its container); raises to refuse it


def bracket_entry_path(where: str, key: Any) -> str:
    """`state['key']`: names a dict entry unambiguously, whatever the key's type."""
    return f"{where}[{key!r}]"


def dotted_entry_path(where: str, key: Any) -> str:
    """`state.key`: shorter, for trees whose keys are plain names."""
    return f"{where}.{key}"


@dataclass(frozen=True)
class StateWalk:
    """Rebuilds a state tree: dicts, lists, tuples (and sets) are walked here, every other value -- a
    tensor, a scalar, anything unknown -- goes to `leaf`, named by its path from `where`.

    exact_types (the default): only dict, OrderedDict, list, tuple and set themselves are containers and
    keep their type; subclasses (namedtuple, defaultdict) reach `leaf`, since weights_only loads cannot
    rebuild them. Otherwise every dict, list and tuple counts and becomes a plain dict, list or tuple,
    and sets reach `leaf`. `check_key` sees every dict key and set member before it is kept.
    """

    leaf: Leaf
    exact_types: bool = True
    check_key: KeyCheck | None = None
    entry_path: Callable[[str, Any], str] = bracket_entry_path

    def __call__(self, value: Any, where: str) -> Any:
        container = self._container_type(value)
        if container is None:
            return self.leaf(value, where)
        if container is dict:
            items = []
            for key, item in value.items():
                self._check(key, where)
                items.append((key, self(item, self.entry_path(where, key))))
            return (type(value) if self.exact_types else dict)(items)
        if container is set:
            for member in value:
                self._check(member, where)
            return set(value)
        items = (self(item, f"{where}[{index}]") for index, item in enumerate(value))
        return (type(value) if self.exact_types else container)(items)

    def _container_type(self, value: Any) -> type | None:
        if self.exact_types:
            value_type = type(value)
            if value_type in (dict, OrderedDict):
                return dict
            return value_type if value_type in (list, tuple, set) else None
        for container in (dict, list, tuple):
            if isinstance(value, container):
                return container
        return None

    def _check(self, key: Any, where: str) -> None:
        if self.check_key is not None:
            self.check_key(key, where)
