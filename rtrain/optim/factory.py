"""Optimizer construction: parameter groups with weight-decay exclusions, and a registry of optimizers.

``build_optimizer(model, "lars", lr=..., momentum=..., weight_decay=...)`` is the one entry point. ``impl``
picks whose kernels run the math:

- ``"torch"`` (default): torch's SGD / AdamW (``foreach``, or ``fused=True`` for torch's fused kernels, which
  run on CPU and CUDA), and rtrain's own multi-tensor LARS and LAMB.
- ``"apex"``: NVIDIA apex (FusedSGD, FusedLAMB, FusedAdam, and LARC over FusedSGD for "lars").
- ``"deepspeed"``: DeepSpeed (FusedLamb, FusedAdam).

Asking for a kernel whose package is missing raises ``ImportError`` naming the package; we never fall back
to a different implementation silently. Note that apex's LARC is not the MLPerf LARS: it multiplies the
gradient by the trust ratio and applies ``lr`` outside the momentum buffer, and it ignores ``lars_adapt``
(it adapts every tensor whose norms are non-zero, excluded groups included).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from rtrain.config import OptimConfig
from rtrain.optim.lamb import LAMB
from rtrain.optim.lars import LARS

IMPLS = ("torch", "apex", "deepspeed")
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
PACKAGE_HINTS = MappingProxyType({
    "apex": "NVIDIA apex (build it from https://github.com/NVIDIA/apex with its CUDA extensions; "
            "PyPI's 'apex' is an unrelated package)",
    "deepspeed": "DeepSpeed (pip install deepspeed, on a machine with CUDA)",
})


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed/adapted group and an excluded one.

    Excluded (``weight_decay=0``, ``lars_adapt=False``): every parameter of a normalization layer (BN, and any
    subclass of ``_BatchNorm`` such as a SyncBatchNorm; also GroupNorm/LayerNorm/InstanceNorm) and every
    parameter named ``bias``. Everything else (conv and linear weights) is in the first group. Empty groups are
    left out; a parameter shared between modules appears once.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_excluded = exclude_bn_bias and (isinstance(module, NORM_LAYERS) or name == "bias")
            (excluded if is_excluded else decayed).append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay, "lars_adapt": True},
              {"params": excluded, "weight_decay": 0.0, "lars_adapt": False}]
    return [g for g in groups if g["params"]]


def _require(package: str, module: str) -> Any:
    """Import a kernel provider's module; its kernels are CUDA-only, so also insist on a CUDA device."""
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"impl='{package}' needs {PACKAGE_HINTS[package]}, but importing '{module}' failed: {err}"
        ) from err
    # Without CUDA, deepspeed tries to JIT-build CPU ops (minutes, or a hang) and apex has no kernels at all.
    if not torch.cuda.is_available():
        raise RuntimeError(f"impl='{package}' optimizer kernels ({module}) need a CUDA device and none is "
                           f"available; use impl='torch' on CPU")
    return imported


@dataclass(frozen=True)
class BuildArgs:
    groups: list[dict[str, Any]]
    lr: float
    momentum: float
    weight_decay: float
    fused: bool | None
    extra: Mapping[str, Any]


def _torch_sgd(a: BuildArgs) -> torch.optim.Optimizer:
    kernel = {"fused": True} if a.fused else {"foreach": True}
    return torch.optim.SGD(a.groups, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                           nesterov=a.extra.get("nesterov", False), **kernel)


def _torch_adamw(a: BuildArgs) -> torch.optim.Optimizer:
    kernel = {"fused": True} if a.fused else {"foreach": True}
    return torch.optim.AdamW(a.groups, lr=a.lr, betas=a.extra.get("betas", (0.9, 0.999)),
                             eps=a.extra.get("eps", 1e-8), weight_decay=a.weight_decay, **kernel)


def _torch_lars(a: BuildArgs) -> torch.optim.Optimizer:
    _refuse_torch_fused("lars", a.fused)
    return LARS(a.groups, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                eta=a.extra.get("eta", 0.001), eps=a.extra.get("eps", 0.0))


def _torch_lamb(a: BuildArgs) -> torch.optim.Optimizer:
    _refuse_torch_fused("lamb", a.fused)
    return LAMB(a.groups, lr=a.lr, betas=a.extra.get("betas", (0.9, 0.999)),
                eps=a.extra.get("eps", 1e-6), weight_decay=a.weight_decay)


def _refuse_torch_fused(name: str, fused: bool | None) -> None:
    if fused:
        raise ValueError(f"optimizer '{name}': torch has no fused kernel for it (rtrain's is multi-tensor); "
                         f"use fused=None, or impl='apex'/'deepspeed' where available")


def _apex_sgd(a: BuildArgs) -> torch.optim.Optimizer:
    apex_optimizers = _require("apex", "apex.optimizers")
    return apex_optimizers.FusedSGD(a.groups, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                                    nesterov=a.extra.get("nesterov", False))


def _apex_lars(a: BuildArgs) -> Any:
    apex_parallel = _require("apex", "apex.parallel")
    sgd = _apex_sgd(BuildArgs(a.groups, a.lr, a.momentum, a.weight_decay, a.fused, {}))
    # clip=False is LARC's "scale" mode, the one that matches LARS's trust ratio.
    return apex_parallel.LARC(sgd, trust_coefficient=a.extra.get("eta", 0.001), clip=False,
                              eps=a.extra.get("eps", 0.0))


def _apex_lamb(a: BuildArgs) -> torch.optim.Optimizer:
    apex_optimizers = _require("apex", "apex.optimizers")
    # use_nvlamb=False: no trust ratio on groups with weight_decay 0, which is our exclusion group.
    return apex_optimizers.FusedLAMB(a.groups, lr=a.lr, betas=a.extra.get("betas", (0.9, 0.999)),
                                     eps=a.extra.get("eps", 1e-6), weight_decay=a.weight_decay, use_nvlamb=False)


def _apex_adamw(a: BuildArgs) -> torch.optim.Optimizer:
    apex_optimizers = _require("apex", "apex.optimizers")
    return apex_optimizers.FusedAdam(a.groups, lr=a.lr, betas=a.extra.get("betas", (0.9, 0.999)),
                                     eps=a.extra.get("eps", 1e-8), weight_decay=a.weight_decay, adam_w_mode=True)


def _deepspeed_lamb(a: BuildArgs) -> torch.optim.Optimizer:
    ds_lamb = _require("deepspeed", "deepspeed.ops.lamb")
    return ds_lamb.FusedLamb(a.groups, lr=a.lr, betas=a.extra.get("betas", (0.9, 0.999)),
                             eps=a.extra.get("eps", 1e-6), weight_decay=a.weight_decay)


def _deepspeed_adamw(a: BuildArgs) -> torch.optim.Optimizer:
    ds_adam = _require("deepspeed", "deepspeed.ops.adam")
    return ds_adam.FusedAdam(a.groups, lr=a.lr, betas=a.extra.get("betas", (0.9, 0.999)),
                             eps=a.extra.get("eps", 1e-8), weight_decay=a.weight_decay, adam_w_mode=True)


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: the extra keyword arguments it accepts and a builder per kernel provider."""

    name: str
    extra_keys: frozenset[str]
    builders: Mapping[str, Callable[[BuildArgs], Any]]


OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType({
    "sgd": OptimizerSpec("sgd", frozenset({"nesterov"}),
                         MappingProxyType({"torch": _torch_sgd, "apex": _apex_sgd})),
    "lars": OptimizerSpec("lars", frozenset({"eta", "eps"}),
                          MappingProxyType({"torch": _torch_lars, "apex": _apex_lars})),
    "lamb": OptimizerSpec("lamb", frozenset({"betas", "eps"}),
                          MappingProxyType({"torch": _torch_lamb, "apex": _apex_lamb, "deepspeed": _deepspeed_lamb})),
    "adamw": OptimizerSpec("adamw", frozenset({"betas", "eps"}),
                           MappingProxyType({"torch": _torch_adamw, "apex": _apex_adamw,
                                             "deepspeed": _deepspeed_adamw})),
})


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    impl: str = "torch",
    fused: bool | None = None,
    exclude_bn_bias: bool = True,
    **extra: Any,
) -> Any:
    """Build optimizer ``name`` over ``param_groups(model, weight_decay, exclude_bn_bias)``.

    ``momentum`` is unused by the Adam family (pass ``betas=`` instead). ``fused=True`` selects torch's fused
    SGD/AdamW kernels; apex and deepspeed kernels are fused by construction, so ``fused=False`` with them is an
    error rather than a silent swap.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; known: {sorted(OPTIMIZERS)}")
    spec = OPTIMIZERS[name]
    if impl not in IMPLS:
        raise ValueError(f"unknown optimizer impl '{impl}'; known: {list(IMPLS)}")
    if impl not in spec.builders:
        raise ValueError(f"optimizer '{name}' has no impl='{impl}' kernel; available: {sorted(spec.builders)}")
    if impl != "torch" and fused is False:
        raise ValueError(f"impl='{impl}' kernels are always fused; fused=False is only meaningful with impl='torch'")
    unknown = set(extra) - spec.extra_keys
    if unknown:
        raise TypeError(f"optimizer '{name}' got unexpected options {sorted(unknown)}; "
                        f"it accepts {sorted(spec.extra_keys)}")
    groups = param_groups(model, weight_decay, exclude_bn_bias)
    return spec.builders[impl](BuildArgs(groups, lr, momentum, weight_decay, fused, MappingProxyType(extra)))


def optimizer_from_config(model: nn.Module, cfg: OptimConfig, lr: float) -> Any:
    """The recipe's optimizer section over ``model``. ``lr`` is where the schedule starts (its lr at step 0):
    the schedule owns the learning rate from then on."""
    extra: dict[str, Any] = {}
    if cfg.name == "sgd":
        extra["nesterov"] = cfg.nesterov
    elif cfg.name == "lars":
        extra.update(eta=cfg.eta, eps=cfg.eps)
    else:
        extra["betas"] = tuple(cfg.betas)
    return build_optimizer(model, cfg.name, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           impl=cfg.impl, fused=cfg.fused, exclude_bn_bias=cfg.exclude_bn_bias, **extra)
