"""LAMB against a plain per-parameter implementation of its formula."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rtrain.optim import LAMB, param_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def _fake_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen) * (0.1 + i)


def _reference_step(groups, state, step, lr, beta1, beta2, eps) -> None:
    for group in groups:
        adapt = group["lars_adapt"]
        wd = group["weight_decay"] if adapt else 0.0
        for p in group["params"]:
            g = p.grad
            m, v = state.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            state[id(p)] = (m, v)
            update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps) + wd * p
            trust = 1.0
            if adapt and p.norm() > 0 and update.norm() > 0:
                trust = (p.norm() / update.norm()).item()
            p.sub_(lr * trust * update)


@pytest.mark.parametrize("exclude_bn_bias", [True, False])
def test_matches_per_parameter_reference(exclude_bn_bias):
    model = _model()
    reference = copy.deepcopy(model).double()
    opt = LAMB(param_groups(model, 0.1, exclude_bn_bias), lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1)
    ref_groups = param_groups(reference, 0.1, exclude_bn_bias)
    state: dict = {}
    for step in range(1, 5):
        _fake_grads(list(model.parameters()), step)
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.grad = p.grad.double()
            _reference_step(ref_groups, state, step, 0.01, 0.8, 0.9, 1e-3)
        opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q.float(), rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_zero_weight_gets_trust_one():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, -1.0])
    LAMB([p], lr=0.1, eps=0.0).step()
    # first step: bias-corrected m / sqrt(v) = sign(g), trust 1
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1]))


def test_state_dict_round_trip_resumes_bit_identically():
    straight = _model()
    opt = LAMB(param_groups(straight, 0.01), lr=0.01, weight_decay=0.01)
    for step in range(2):
        _fake_grads(list(straight.parameters()), step)
        opt.step()
    saved = copy.deepcopy((straight.state_dict(), opt.state_dict()))
    for step in range(2, 4):
        _fake_grads(list(straight.parameters()), step)
        opt.step()

    resumed = _model()
    resumed.load_state_dict(saved[0])
    resumed_opt = LAMB(param_groups(resumed, 0.01), lr=0.01, weight_decay=0.01)
    resumed_opt.load_state_dict(saved[1])
    for step in range(2, 4):
        _fake_grads(list(resumed.parameters()), step)
        resumed_opt.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
