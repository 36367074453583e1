"""LARS (You et al., 2017) exactly as the MLPerf ResNet-50 reference applies it, with multi-tensor kernels.

Per parameter tensor w with gradient g, in a group with ``lars_adapt=True``::

    trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)     (1 when ||w|| == 0 or ||g|| == 0)
    v     = momentum * v + lr * trust * (g + wd * w)
    w     = w - v

A group with ``lars_adapt=False`` (BN parameters and biases, see ``rtrain.optim.param_groups``) gets neither
the trust ratio nor weight decay: ``v = momentum * v + lr * g``. The learning rate is folded into the
momentum buffer (as in the MLPerf reference), so a changing lr only affects new contributions.

The default path runs every group as a handful of ``torch._foreach_*`` calls per (device, dtype) bucket —
on CUDA these are multi-tensor-apply kernels, so the step costs a few launches instead of ~10 per tensor.
``foreach=False`` runs the same math one tensor at a time (the baseline of ``benchmarks/lars.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

MOMENTUM_BUFFER = "momentum_buffer"


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum (MLPerf reference semantics).

    Momentum buffers live in ``self.state[p]["momentum_buffer"]``, so ``state_dict()`` /
    ``load_state_dict()`` resume a run exactly.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 0.0,
        foreach: bool = True,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("eta", eta), ("eps", eps)):
            if value < 0.0:
                raise ValueError(f"LARS: {name} must be >= 0, got {value}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "eps": eps,
                    "lars_adapt": True, "foreach": foreach}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
            if not params:
                continue
            if group["foreach"]:
                for bucket in bucket_by_device_and_dtype(params):
                    self._step_multi_tensor(group, bucket)
            else:
                for p in params:
                    self._step_one_tensor(group, p)
        return loss

    def _momentum_buffers(self, params: list[Tensor]) -> list[Tensor]:
        buffers = []
        for p in params:
            state = self.state[p]
            if MOMENTUM_BUFFER not in state:
                # Zeros make the first step v = lr * trust * d, as in the reference.
                state[MOMENTUM_BUFFER] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state[MOMENTUM_BUFFER])
        return buffers

    def _step_multi_tensor(self, group: dict[str, Any], params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        lr, momentum = group["lr"], group["momentum"]
        if not group["lars_adapt"]:
            # Excluded tensors (most of ResNet's, by count) take the cheap path: lr folded in via alpha.
            if momentum != 0.0:
                buffers = self._momentum_buffers(params)
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads, alpha=lr)
                torch._foreach_sub_(params, buffers)
            else:
                torch._foreach_add_(params, grads, alpha=-lr)
            return

        weight_decay = group["weight_decay"]
        trust = trust_ratios(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads)),
                             group["eta"], weight_decay, group["eps"])
        # One scale per tensor, kept on the device: no host sync, at the cost of one small kernel per tensor.
        scales = list((trust * lr).unbind())
        if weight_decay != 0.0:
            updates = torch._foreach_add(grads, params, alpha=weight_decay)
            torch._foreach_mul_(updates, scales)
        else:
            updates = torch._foreach_mul(grads, scales)
        if momentum != 0.0:
            buffers = self._momentum_buffers(params)
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, updates)
            torch._foreach_sub_(params, buffers)
        else:
            torch._foreach_sub_(params, updates)

    def _step_one_tensor(self, group: dict[str, Any], p: Tensor) -> None:
        """The same operations as ``_step_multi_tensor``, one tensor at a time (so results are identical)."""
        grad = p.grad
        lr, momentum = group["lr"], group["momentum"]
        buffer = self._momentum_buffers([p])[0] if momentum != 0.0 else None
        if not group["lars_adapt"]:
            if buffer is not None:
                buffer.mul_(momentum).add_(grad, alpha=lr)
                p.sub_(buffer)
            else:
                p.add_(grad, alpha=-lr)
            return

        weight_decay = group["weight_decay"]
        trust = trust_ratios(torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad),
                             group["eta"], weight_decay, group["eps"])
        scale = trust * lr
        update = grad.add(p, alpha=weight_decay).mul_(scale) if weight_decay != 0.0 else grad.mul(scale)
        if buffer is not None:
            buffer.mul_(momentum).add_(update)
            p.sub_(buffer)
        else:
            p.sub_(update)


def trust_ratios(weight_norms: Tensor, grad_norms: Tensor, eta: float, weight_decay: float,
                 eps: float) -> Tensor:
    """eta * ||w|| / (||g|| + wd * ||w|| + eps), elementwise; 1 where either norm is 0.

    Stays on the device (no ``.item()``), so the step never synchronizes with the host.
    """
    ratio = eta * weight_norms / (grad_norms + weight_decay * weight_norms + eps)
    both_nonzero = (weight_norms > 0) & (grad_norms > 0)
    return torch.where(both_nonzero, ratio, torch.ones_like(ratio))


def bucket_by_device_and_dtype(params: list[Tensor]) -> list[list[Tensor]]:
    """Foreach kernels need one device and dtype per call (mixed lists fall back to slow paths)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for p in params:
        buckets[(p.device, p.dtype)].append(p)
    return list(buckets.values())
