"""Decisions every rank must take at the same step (stop now?), agreed with one tiny collective.

The flag travels over gloo on the CPU even when training uses NCCL, so asking every step costs no device
synchronisation: a 1-element all_reduce among the ranks' host threads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StepAgreement:
    """`any(flag)` over all ranks; must be created and called by every rank at the same points."""

    def __init__(self) -> None:
        self._group = None
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self._distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # collective: every rank creates it

    def any(self, flag: bool) -> bool:
        if not self._distributed:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return bool(value.item())
