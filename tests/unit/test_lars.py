"""LARS against a plain per-parameter implementation of the MLPerf formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rtrain.optim import LARS, param_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _fake_grads(params, step: int) -> None:
    """Deterministic gradients of varied scale per step (no forward pass needed to exercise the math)."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=gen) * (0.1 + i)).to(p.device)


def _reference_step(groups, buffers, lr, momentum, eta, eps) -> None:
    """The formula, one float64 tensor at a time, with Python control flow for the zero-norm rule."""
    for group in groups:
        adapt = group["lars_adapt"]
        wd = group["weight_decay"] if adapt else 0.0
        for p in group["params"]:
            g = p.grad
            trust = 1.0
            if adapt:
                w_norm, g_norm = p.norm().item(), g.norm().item()
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / (g_norm + wd * w_norm + eps)
            v = buffers.get(id(p), torch.zeros_like(p))
            v = momentum * v + lr * trust * (g + wd * p)
            buffers[id(p)] = v
            p.sub_(v)


def _lrs(steps: int) -> list[float]:
    return [2.0 * (i + 1) / steps for i in range(steps)]  # a changing lr: it is folded into the buffer


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("exclude_bn_bias", [True, False])
def test_matches_per_parameter_reference(foreach, momentum, exclude_bn_bias):
    _check_against_reference(foreach, momentum, exclude_bn_bias, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("foreach", [True, False])
def test_cuda_matches_per_parameter_reference(foreach):
    _check_against_reference(foreach, 0.9, True, device="cuda")


def _check_against_reference(foreach: bool, momentum: float, exclude_bn_bias: bool, device: str) -> None:
    model = _model()
    reference = copy.deepcopy(model).double()
    model.to(device)
    # A large wd, eta and eps so that each term of the trust ratio moves the result well above fp32 noise.
    opt = LARS(param_groups(model, 0.05, exclude_bn_bias), lr=1.0, momentum=momentum, weight_decay=0.05,
               eta=0.02, eps=0.01, foreach=foreach)
    ref_groups = param_groups(reference, 0.05, exclude_bn_bias)
    assert len(ref_groups) == (2 if exclude_bn_bias else 1)
    buffers: dict[int, torch.Tensor] = {}
    for step, lr in enumerate(_lrs(5)):
        _fake_grads(list(model.parameters()), step)
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.grad = p.grad.double().cpu()
            _reference_step(ref_groups, buffers, lr, momentum, eta=0.02, eps=0.01)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.cpu(), q.float(), rtol=1e-6, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_trust_ratio_value_for_one_tensor():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.0, 2.0])  # ||g|| = 2
    LARS([w], lr=0.5, momentum=0.0, weight_decay=0.1, eta=0.01).step()
    trust = 0.01 * 5 / (2 + 0.1 * 5)
    expected = torch.tensor([3.0 - 0.5 * trust * 0.3, 4.0 - 0.5 * trust * (2.0 + 0.4)])
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_norms_give_trust_one(foreach):
    zero_weight = nn.Parameter(torch.zeros(3))
    zero_weight.grad = torch.tensor([1.0, -2.0, 0.5])
    zero_grad = nn.Parameter(torch.tensor([1.0, 2.0]))
    zero_grad.grad = torch.zeros(2)
    opt = LARS([zero_weight, zero_grad], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.001, foreach=foreach)
    opt.step()
    # trust 1: the plain SGD step lr * (g + wd * w)
    torch.testing.assert_close(zero_weight.detach(), torch.tensor([-0.1, 0.2, -0.05]))
    torch.testing.assert_close(zero_grad.detach(), torch.tensor([1.0 - 0.05, 2.0 - 0.1]))
    assert all(math.isfinite(v) for v in torch.cat([zero_weight, zero_grad]).tolist())


def test_excluded_group_gets_neither_trust_nor_decay():
    p = nn.Parameter(torch.tensor([1.0, -1.0]))
    p.grad = torch.tensor([0.5, 0.5])
    # weight_decay set on purpose: lars_adapt=False must ignore it
    opt = LARS([{"params": [p], "lars_adapt": False, "weight_decay": 0.3}], lr=0.2, momentum=0.9)
    opt.step()
    opt.step()
    # v1 = 0.1; v2 = 0.9 * 0.1 + 0.1 = 0.19; w = w - 0.29
    torch.testing.assert_close(p.detach(), torch.tensor([0.71, -1.29]))


def test_gradients_are_left_untouched_and_grad_none_skipped():
    model = _model()
    params = list(model.parameters())
    _fake_grads(params, 0)
    params[0].grad = None
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    before = params[0].detach().clone()
    LARS(param_groups(model, 1e-4), lr=1.0, weight_decay=1e-4).step()
    for p, g in zip(params, grads):
        if g is not None:
            assert torch.equal(p.grad, g)
    assert torch.equal(params[0].detach(), before)


def test_mixed_dtypes_in_one_group():
    a = nn.Parameter(torch.ones(4))
    b = nn.Parameter(torch.ones(4, dtype=torch.float64))
    a.grad, b.grad = torch.full((4,), 0.5), torch.full((4,), 0.5, dtype=torch.float64)
    LARS([a, b], lr=1.0, momentum=0.0, eta=0.1).step()
    trust = 0.1 * 2.0 / 1.0
    torch.testing.assert_close(a.detach(), torch.full((4,), 1 - trust * 0.5))
    torch.testing.assert_close(b.detach(), torch.full((4,), 1 - trust * 0.5, dtype=torch.float64))


def _train(model, opt, steps: range) -> None:
    for step in steps:
        _fake_grads(list(model.parameters()), step)
        opt.step()


def test_state_dict_round_trip_resumes_bit_identically():
    straight = _model()
    straight_opt = LARS(param_groups(straight, 5e-5), lr=2.0, momentum=0.95, weight_decay=5e-5)
    _train(straight, straight_opt, range(3))
    saved_model = copy.deepcopy(straight.state_dict())
    saved_opt = copy.deepcopy(straight_opt.state_dict())
    _train(straight, straight_opt, range(3, 6))

    resumed = _model()
    resumed.load_state_dict(saved_model)
    resumed_opt = LARS(param_groups(resumed, 5e-5), lr=2.0, momentum=0.95, weight_decay=5e-5)
    resumed_opt.load_state_dict(saved_opt)
    assert all("momentum_buffer" in s for s in resumed_opt.state.values())
    _train(resumed, resumed_opt, range(3, 6))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"momentum": -0.1}, {"weight_decay": -1.0}, {"eta": -1.0}])
def test_rejects_negative_hyperparameters(bad):
    kwargs = {"lr": 0.1} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        LARS([nn.Parameter(torch.ones(1))], **kwargs)
