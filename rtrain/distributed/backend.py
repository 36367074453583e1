"""Data-parallel engines behind one interface: DDP (gloo on CPU, NCCL on GPU) and DeepSpeed.

The train step talks only to a Backend: forward, a per-micro-batch context (DDP's no_sync), backward,
and step (unscale, non-finite check, clip, optimizer step or skip). Backends own the state of what
they wrap (model, optimizer, loss scaler) so a checkpoint is the same call for every engine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler
from torch.nn.parallel import DistributedDataParallel

from rtrain.distributed.waits import CollectiveClock

DDP_STATE_VERSION = 1


@dataclass(frozen=True)
class StepOutcome:
    stepped: bool  # the optimizer updated the weights
    found_inf: bool  # some gradient was inf/nan (the step was skipped)


class Backend(Protocol):
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...
    def micro_context(self, last: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> StepOutcome: ...
    def loss_scale(self) -> float: ...
    def state_dict(self) -> dict[str, Any]: ...  # {"version", "shared": {name: state}, "per_rank": {...}}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def grads_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def any_nonfinite(grads: list[torch.Tensor]) -> bool:
    """One fused pass over the (already all-reduced, so rank-identical) gradients."""
    if not grads:
        return False
    found = torch.zeros(1, device=grads[0].device)
    one = torch.ones(1, device=grads[0].device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    return bool(found.item())


def check_backend_version(state: Any, backend: str, supported: tuple[int, ...]) -> int:
    version = state.get("version") if isinstance(state, dict) else None
    if version not in supported:
        raise ValueError(f"{backend}: checkpoint state version {version!r} is not one of {list(supported)} "
                         f"(not a {backend} checkpoint?)")
    return version


class DDPBackend:
    """torch DDP (or the bare module for one process) with GradScaler-based loss scaling."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: GradScaler, *,
                 device: torch.device, clip_grad_norm: float | None = None, bucket_cap_mb: float = 25.0,
                 static_graph: bool = False, compile_model: bool = False, clock: CollectiveClock | None = None
                 ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        wrapped: nn.Module = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb,
                                              static_graph=static_graph)
            if clock is not None:
                clock.watch_ddp(model)
        self.clock = clock if wrapped is not model else None
        self.wrapped = wrapped
        self._forward = torch.compile(wrapped) if compile_model else wrapped

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.clock is not None:  # DDP broadcasts rank 0's buffers before the module runs: a wait for rank 0
            self.clock.ddp_forward()
        return self._forward(images)

    def micro_context(self, last: bool) -> ContextManager:
        if not last and isinstance(self.wrapped, DistributedDataParallel):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        if self.clock is not None:  # DDP waited for every rank's gradients before backward() returned
            self.clock.backward_done()

    def step(self) -> StepOutcome:
        opt = self.optimizer
        if self.scaler.is_enabled():
            self.scaler.unscale_(opt)
            found_inf = any(v.item() for v in self.scaler._found_inf_per_device(opt).values())
        else:
            found_inf = any_nonfinite(grads_of(opt))
        if self.clip_grad_norm is not None and not found_inf:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
        if self.scaler.is_enabled():
            self.scaler.step(opt)
            self.scaler.update()
        elif not found_inf:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return StepOutcome(stepped=not found_inf, found_inf=found_inf)

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and scaler are the same on every rank: all shared."""
        return {"version": DDP_STATE_VERSION, "per_rank": {},
                "shared": {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # version 0: a checkpoint of the first layout, whose entries are the same
        check_backend_version(state, "DDPBackend", (0, DDP_STATE_VERSION))
        shared = state["shared"]
        self.module.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        if shared.get("scaler"):
            self.scaler.load_state_dict(shared["scaler"])

    def close(self) -> None:
        pass
