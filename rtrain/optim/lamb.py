"""LAMB (You et al., 2019), a straightforward multi-tensor implementation.

Per parameter tensor w with gradient g at step t (counted per tensor)::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * w
    trust = ||w|| / ||u||                                  (1 when either norm is 0)
    w = w - lr * trust * u

A group with ``lars_adapt=False`` (BN parameters and biases, see ``rtrain.optim.param_groups``) gets neither
the trust ratio nor weight decay, i.e. plain Adam there — the same exclusion flag LARS uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from rtrain.optim.lars import bucket_by_device_and_dtype


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive moments. State per tensor: ``step`` (int), ``exp_avg``, ``exp_avg_sq``."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"LAMB: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB: betas must lie in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "lars_adapt": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LAMB does not support sparse gradients")
            for bucket in bucket_by_device_and_dtype(params):
                self._step_group(group, bucket)
        return loss

    def _state_lists(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[int]]:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        beta1, beta2 = group["betas"]
        adapt = group["lars_adapt"]
        weight_decay = group["weight_decay"] if adapt else 0.0
        exp_avgs, exp_avg_sqs, steps = self._state_lists(params)

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        # Steps are host ints, so bias corrections are host floats: no device sync.
        denominators = torch._foreach_div(exp_avg_sqs, [1.0 - beta2 ** t for t in steps])
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, [1.0 - beta1 ** t for t in steps])
        torch._foreach_div_(updates, denominators)
        if weight_decay != 0.0:
            torch._foreach_add_(updates, params, alpha=weight_decay)

        if adapt:
            weight_norms = torch.stack(torch._foreach_norm(params))
            update_norms = torch.stack(torch._foreach_norm(updates))
            ratio = weight_norms / update_norms
            trust = torch.where((weight_norms > 0) & (update_norms > 0), ratio, torch.ones_like(ratio))
            torch._foreach_mul_(updates, list((trust * group["lr"]).unbind()))
        else:
            torch._foreach_mul_(updates, group["lr"])
        torch._foreach_sub_(params, updates)
