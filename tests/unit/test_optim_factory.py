"""Optimizer registry, parameter groups and kernel-provider errors."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from rtrain.optim import IMPLS, OPTIMIZERS, build_optimizer, param_groups

# (name, fused) pairs that run on this machine: every registry entry, plus torch's fused kernels.
TORCH_VARIANTS = [(name, None) for name in OPTIMIZERS] + [("sgd", True), ("adamw", True)]
HYPER = {"sgd": 0.05, "lars": 5.0, "lamb": 0.01, "adamw": 0.01}


class TinyNet(nn.Module):
    """Covers every parameter kind param_groups must classify."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.conv_no_bias = nn.Conv2d(4, 4, 1, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(4 * 4 * 4), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x):
        return self.head(self.gn(self.conv_no_bias(torch.relu(self.bn(self.conv(x))))))


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _train(model, opt, steps: range) -> float:
    loss = torch.tensor(0.0)
    for step in steps:
        x, y = _batch(step % 2)  # two batches revisited: the loss must go down
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_param_groups_exclude_every_norm_param_and_bias():
    model = TinyNet()
    decayed, excluded = param_groups(model, 1e-4)
    assert decayed == {"params": decayed["params"], "weight_decay": 1e-4, "lars_adapt": True}
    assert excluded["weight_decay"] == 0.0 and excluded["lars_adapt"] is False
    assert _names(model, decayed["params"]) == {"conv.weight", "conv_no_bias.weight", "head.2.weight"}
    assert _names(model, excluded["params"]) == {
        "conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "head.1.weight", "head.1.bias", "head.2.bias"}


def test_param_groups_without_exclusion_skip_frozen_and_shared():
    model = TinyNet()
    model.conv.weight.requires_grad_(False)
    model.extra = model.conv_no_bias  # the same parameters reachable twice
    (group,) = param_groups(model, 1e-4, exclude_bn_bias=False)
    assert group["lars_adapt"] is True and group["weight_decay"] == 1e-4
    assert len(group["params"]) == len({id(p) for p in group["params"]}) == sum(
        p.requires_grad for p in TinyNet().parameters()) - 1


@pytest.mark.parametrize("name,fused", TORCH_VARIANTS)
def test_registry_optimizer_trains_and_resumes_exactly(name, fused):
    torch.manual_seed(0)
    model = TinyNet()
    opt = build_optimizer(model, name, lr=HYPER[name], momentum=0.9, weight_decay=1e-4, fused=fused)
    first_loss = _train(model, opt, range(1))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    straight_loss = _train(model, opt, range(1, 6))
    assert straight_loss < first_loss

    resumed = TinyNet()
    resumed.load_state_dict(saved[0])
    resumed_opt = build_optimizer(resumed, name, lr=HYPER[name], momentum=0.9, weight_decay=1e-4, fused=fused)
    resumed_opt.load_state_dict(saved[1])
    _train(resumed, resumed_opt, range(1, 6))
    for (key, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_excluded_group_gets_no_weight_decay(name):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    opt = build_optimizer(model, name, lr=0.1, momentum=0.0, weight_decay=0.5)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    assert torch.all(model.weight < 1.0)  # decayed (LARS: trust 1 since ||g|| = 0)
    assert torch.equal(model.bias.detach(), torch.ones(2))


def test_sgd_options_reach_torch():
    opt = build_optimizer(TinyNet(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["foreach"]
    fused = build_optimizer(TinyNet(), "sgd", lr=0.1, fused=True)
    assert fused.defaults["fused"] is True
    lars = build_optimizer(TinyNet(), "lars", lr=1.0, weight_decay=5e-5, eta=0.002, eps=1e-8)
    assert lars.defaults["eta"] == 0.002 and lars.defaults["eps"] == 1e-8


EXTERNAL = [(name, impl) for name, spec in OPTIMIZERS.items() for impl in spec.builders if impl != "torch"]
PACKAGE_MODULES = {
    "apex": ("apex", "apex.optimizers", "apex.parallel"),
    "deepspeed": ("deepspeed", "deepspeed.ops", "deepspeed.ops.lamb", "deepspeed.ops.adam"),
}


@pytest.mark.parametrize("name,impl", EXTERNAL)
def test_missing_kernel_package_is_named(name, impl, monkeypatch):
    for module in PACKAGE_MODULES[impl]:  # None in sys.modules makes the import fail as if not installed
        monkeypatch.setitem(sys.modules, module, None)
    package = {"apex": "NVIDIA apex", "deepspeed": "DeepSpeed"}[impl]
    with pytest.raises(ImportError, match=f"impl='{impl}' needs {package}"):
        build_optimizer(TinyNet(), name, lr=0.1, impl=impl)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_installed_cuda_only_kernels_refuse_cpu(name):
    pytest.importorskip("deepspeed.ops.lamb", reason="deepspeed not installed")
    with pytest.raises(RuntimeError, match="impl='deepspeed' .* need a CUDA device"):
        build_optimizer(TinyNet(), name, lr=0.1, impl="deepspeed")


def test_every_registered_impl_is_known_and_every_optimizer_has_torch():
    for spec in OPTIMIZERS.values():
        assert set(spec.builders) <= set(IMPLS) and "torch" in spec.builders


@pytest.mark.parametrize("kwargs,error,match", [
    ({"name": "adam"}, ValueError, "unknown optimizer 'adam'"),
    ({"name": "sgd", "impl": "cuda"}, ValueError, "unknown optimizer impl 'cuda'"),
    ({"name": "sgd", "impl": "deepspeed"}, ValueError, "no impl='deepspeed' kernel"),
    ({"name": "lars", "fused": True}, ValueError, "no fused kernel"),
    ({"name": "lamb", "impl": "apex", "fused": False}, ValueError, "always fused"),
    ({"name": "sgd", "eta": 0.1}, TypeError, r"unexpected options \['eta'\]"),
])
def test_bad_requests_are_rejected_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_optimizer(TinyNet(), lr=0.1, **kwargs)
