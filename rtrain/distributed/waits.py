"""How long this rank waited on its peers: the collective wait of a straggler report.

In synchronous data parallelism every rank's step ends together, so a rank's step time alone cannot say who
is slow: a fast rank spends the difference blocked in a collective, waiting for the slowest one. The clock
adds up those blocked seconds where they happen: each of rtrain's SyncBN all_reduces (forward and backward),
DDP's buffer broadcast at the start of its forward (from DDP's forward to the wrapped module's, timed by a
forward pre-hook), and DDP's gradient wait at the end of the backward pass (from this rank's last gradient to
the end of the all_reduces, timed by a post-accumulate-grad hook). A rank's own time is then its data wait
plus its steps minus this. What it measures includes the transfer itself, which is the same on every rank;
NCCL's asynchronous kernels are timed by when the host gets past them (a CUDA rank syncs in DDP's finalize).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class CollectiveClock:
    def __init__(self) -> None:
        self.seconds = 0.0  # in all, since the clock was made
        self._last_grad_ready: float | None = None
        self._ddp_forward: float | None = None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    def watch_ddp(self, model: nn.Module) -> None:
        """`model` is what DDP wraps: note when its forward begins (after DDP's buffer broadcast, which
        `ddp_forward()` started) and when each of its gradients is ready (`backward_done()` adds the wait after
        the last)."""
        model.register_forward_pre_hook(self._module_forward)
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._grad_ready)

    def ddp_forward(self) -> None:
        self._ddp_forward = time.perf_counter()

    def _module_forward(self, _module: nn.Module, _args: object) -> None:
        if self._ddp_forward is not None:
            self.seconds += time.perf_counter() - self._ddp_forward
            self._ddp_forward = None

    def _grad_ready(self, _param: torch.Tensor) -> None:
        self._last_grad_ready = time.perf_counter()

    def backward_done(self) -> None:
        if self._last_grad_ready is not None:
            self.seconds += time.perf_counter() - self._last_grad_ready
            self._last_grad_ready = None
