"""Synchronized batch normalization that runs on gloo (CPU) and NCCL (GPU).

torch.nn.SyncBatchNorm refuses CPU tensors, so the CPU recipes (and the 2-process gloo tests) need this one.
Per layer and step it costs one packed all_reduce forward (sum, sum of squares, count: 2C+1 floats) and one
backward (sum of dy, sum of dy * xhat: 2C floats). Statistics are accumulated in fp32 whatever the input
dtype. Weight and bias gradients are returned per rank (the local sums) — DDP averages them like any other
gradient, exactly as with torch.nn.SyncBatchNorm.

BN groups (MLPerf's ``bn_group``): ranks split into consecutive groups of ``k``; statistics are shared within
a group only. ``bn_group(k)`` must be called by every rank, since ``dist.new_group`` is collective.

Eval mode, a group of one rank, and an uninitialized process group all give plain ``F.batch_norm``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from rtrain.distributed.waits import CollectiveClock

IMPLS = ("rtrain", "torch", "apex")


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_group, clock):
        channels = x.shape[1]
        dims = _reduce_dims(x)
        x32 = x.float()
        local_count = x.numel() // channels
        count = torch.full((1,), float(local_count), dtype=torch.float32, device=x.device)
        packed = torch.cat([x32.sum(dims), (x32 * x32).sum(dims), count])
        _all_reduce(packed, process_group, clock)
        total = packed[2 * channels]
        if local_count <= 1 and total.item() <= 1:  # the sync is only paid on this degenerate path
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, "
                             f"got input of shape {tuple(x.shape)} on every rank of the group")
        mean = packed[:channels] / total
        var = (packed[channels:2 * channels] / total - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)

        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (total / (total - 1.0))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.process_group = process_group
        ctx.clock = clock
        y = (x32 - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())
        if weight is not None:
            y = y * _channel_view(weight.float(), x.dim())
        if bias is not None:
            y = y + _channel_view(bias.float(), x.dim())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, mean, invstd, total = ctx.saved_tensors
        ndim = x.dim()
        dims = _reduce_dims(x)
        dy = grad_output.float()
        xhat = (x.float() - _channel_view(mean, ndim)) * _channel_view(invstd, ndim)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)

        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            channels = x.shape[1]
            packed = torch.cat([sum_dy, sum_dy_xhat])
            _all_reduce(packed, ctx.process_group, ctx.clock)
            mean_dy = packed[:channels] / total
            mean_dy_xhat = packed[channels:] / total
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (dy - _channel_view(mean_dy, ndim) - xhat * _channel_view(mean_dy_xhat, ndim))
            grad_x = (grad_x * _channel_view(scale, ndim)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _all_reduce(packed: Tensor, process_group, clock: CollectiveClock | None) -> None:
    if clock is None:
        dist.all_reduce(packed, group=process_group)
        return
    with clock.waiting():
        dist.all_reduce(packed, group=process_group)


def _group_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the batches of every rank in ``process_group`` (None: all ranks); N-d inputs (N >= 2)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.clock: CollectiveClock | None = None  # adds up the all_reduces' seconds (a straggler report)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of at least 2 dims (N, C, ...), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Momentum semantics copied from _BatchNorm.forward: None means a cumulative moving average.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracks = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracks else None
        running_var = self.running_var if tracks else None
        if not use_batch_stats or _group_size(self.process_group) == 1:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                use_batch_stats, factor, self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var,
                                            self.eps, factor, self.process_group, self.clock)


def bn_group(group_size: int | None):
    """Create MLPerf-style BN groups (consecutive ranks, ``group_size`` each) and return this rank's.

    Collective: every rank must call it, in the same order relative to other ``new_group`` calls. Returns None
    (the default group) when ``group_size`` is None or the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("bn_group needs an initialized torch.distributed process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    if group_size is None or group_size == world:
        return None
    if group_size < 1 or world % group_size != 0:
        raise ValueError(f"BN group_size must divide the world size {world}, got {group_size}")
    mine = None
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def _sync_bn_class(impl: str) -> type[nn.Module]:
    if impl == "rtrain":
        return SyncBatchNorm
    if impl == "torch":
        if not torch.cuda.is_available():
            raise RuntimeError("syncbn impl='torch' (torch.nn.SyncBatchNorm) needs CUDA tensors and no CUDA device "
                               "is available; use impl='rtrain', which also runs on CPU/gloo")
        return nn.SyncBatchNorm
    if impl == "apex":
        try:
            return importlib.import_module("apex.parallel").SyncBatchNorm
        except ImportError as err:
            raise ImportError("syncbn impl='apex' needs NVIDIA apex (built from https://github.com/NVIDIA/apex; "
                              f"PyPI's 'apex' is an unrelated package), but importing apex.parallel failed: {err}"
                              ) from err
    raise ValueError(f"unknown syncbn impl '{impl}'; known: {list(IMPLS)}")


def convert_sync_batchnorm(model: nn.Module, impl: str = "rtrain", group_size: int | None = None,
                           clock: CollectiveClock | None = None) -> nn.Module:
    """Replace every nn.BatchNorm*d in ``model`` by a synchronized BN, keeping parameters and buffers.

    The original Parameter objects are reused, so an optimizer built before the conversion still updates them.
    ``group_size`` creates BN groups (``bn_group``) when torch.distributed is initialized; without it there is
    a single rank and every group is the local batch. A `clock` (rtrain's impl only) times the all_reduces.
    """
    sync_class = _sync_bn_class(impl)
    process_group = None
    if group_size is not None and dist.is_available() and dist.is_initialized():
        process_group = bn_group(group_size)
    return _replace_batchnorms(model, lambda bn: _make_sync(sync_class, bn, process_group, clock))


def _replace_batchnorms(module: nn.Module, make: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        return make(module)
    for name, child in module.named_children():
        converted = _replace_batchnorms(child, make)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _make_sync(sync_class: type[nn.Module], bn: _BatchNorm, process_group, clock: CollectiveClock | None
               ) -> nn.Module:
    sync = sync_class(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                      process_group=process_group)
    if isinstance(sync, SyncBatchNorm):
        sync.clock = clock
    if bn.affine:
        with torch.no_grad():
            sync.weight = bn.weight
            sync.bias = bn.bias
    sync.running_mean = bn.running_mean
    sync.running_var = bn.running_var
    sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync
