"""Synchronized BN: k ranks x batch b behave like one rank x batch k*b with plain nn.BatchNorm (gloo, CPU)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rtrain.distributed.syncbn import SyncBatchNorm, bn_group, convert_sync_batchnorm

ATOL = 1e-5


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _reference_bn(shape, momentum, seed):
    """A plain BN with non-trivial affine parameters and running stats, plus the full-batch data."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    bn_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    bn = bn_class(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=gen))
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    inputs = [torch.randn(shape, generator=gen) * 3 + 1 for _ in range(2)]
    output_grads = [torch.randn(shape, generator=gen) for _ in range(2)]
    return bn, inputs, output_grads


def _check_against_plain_bn(rank_in_group: int, group_ranks: int, process_group, shape, momentum,
                            seed: int, channels_last: bool = False, device: str = "cpu") -> None:
    """Two training steps on this rank's slice must reproduce the plain BN run on the group's whole batch."""
    reference, inputs, output_grads = _reference_bn(shape, momentum, seed)
    sync = SyncBatchNorm(shape[1], momentum=momentum, process_group=process_group)
    sync.load_state_dict(reference.state_dict())
    reference.to(device), sync.to(device)
    inputs = [x.to(device) for x in inputs]
    output_grads = [dy.to(device) for dy in output_grads]
    b = shape[0] // group_ranks
    rows = slice(rank_in_group * b, (rank_in_group + 1) * b)
    for x_full, dy_full in zip(inputs, output_grads):
        x_ref = x_full.clone().requires_grad_(True)
        y_ref = reference(x_ref)
        y_ref.backward(dy_full)

        x_local = x_full[rows].clone()
        if channels_last:
            x_local = x_local.contiguous(memory_format=torch.channels_last)
        x_local.requires_grad_(True)
        sync.zero_grad()
        y = sync(x_local)
        y.backward(dy_full[rows])
        grads = torch.cat([sync.weight.grad, sync.bias.grad])
        dist.all_reduce(grads, group=process_group)  # DDP's job: the per-rank sums add up to the full grad

        torch.testing.assert_close(y, y_ref[rows], atol=ATOL, rtol=0)
        torch.testing.assert_close(x_local.grad, x_ref.grad[rows], atol=ATOL, rtol=0)
        torch.testing.assert_close(grads, torch.cat([reference.weight.grad, reference.bias.grad]),
                                   atol=ATOL, rtol=0)
        reference.zero_grad()
    torch.testing.assert_close(sync.running_mean, reference.running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(sync.running_var, reference.running_var, atol=ATOL, rtol=0)
    assert int(sync.num_batches_tracked) == int(reference.num_batches_tracked) == 2

    # Eval mode is plain BN with the (synchronized) running statistics.
    sync.eval(), reference.eval()
    torch.testing.assert_close(sync(inputs[0][rows]), reference(inputs[0])[rows], atol=ATOL, rtol=0)


def _world_worker(rank: int, world: int, port: int, device: str = "cpu") -> None:
    _init(rank, world, port)
    try:
        if device != "cpu":  # gloo all-reduces CUDA tensors too: two ranks can share one GPU
            _check_against_plain_bn(rank, world, None, (8, 3, 5, 4), momentum=0.1, seed=0, device=device)
            _check_against_plain_bn(rank, world, None, (8, 3, 5, 4), 0.1, seed=1, channels_last=True, device=device)
            return
        _check_against_plain_bn(rank, world, None, (8, 3, 5, 4), momentum=0.1, seed=0)
        _check_against_plain_bn(rank, world, None, (8, 3, 5, 4), momentum=0.1, seed=1, channels_last=True)
        _check_against_plain_bn(rank, world, None, (6, 4), momentum=None, seed=2)  # cumulative average
        _check_against_plain_bn(rank, world, None, (4, 2, 3, 3, 2), momentum=0.3, seed=3)
    finally:
        dist.destroy_process_group()


def _group_worker(rank: int, world: int, port: int, group_size: int) -> None:
    _init(rank, world, port)
    try:
        group = bn_group(group_size)
        assert dist.get_world_size(group) == group_size
        # Each group sees its own data (seed by group index) and must match BN over that group's batch only.
        group_index = rank // group_size
        _check_against_plain_bn(rank % group_size, group_size, group, (2 * group_size, 3, 4, 4),
                                momentum=0.1, seed=10 + group_index)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~11 s: two spawned interpreters importing torch, four layer shapes
def test_two_ranks_match_one_rank_with_double_batch(port):
    mp.spawn(_world_worker, args=(2, port), nprocs=2, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_ranks_on_cuda_tensors(port):
    mp.spawn(_world_worker, args=(2, port, "cuda"), nprocs=2, join=True)


def test_bn_group_of_one_is_local_bn(port):
    mp.spawn(_group_worker, args=(2, port, 1), nprocs=2, join=True)


@pytest.mark.slow
def test_bn_groups_of_two_among_four_ranks(port):
    mp.spawn(_group_worker, args=(4, port, 2), nprocs=4, join=True)


def _ddp_worker(rank: int, world: int, port: int) -> None:
    """A converted conv net under DDP gets the same parameter gradients as the plain net on the whole batch."""
    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
        synced = convert_sync_batchnorm(copy.deepcopy(plain))
        ddp = nn.parallel.DistributedDataParallel(synced)
        x = torch.randn(2 * world, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        (plain(x) ** 2).mean().backward()
        rows = slice(rank * 2, rank * 2 + 2)
        (ddp(x[rows]) ** 2).mean().backward()  # DDP averages: the mean of per-rank means is the global mean
        for (name, p_plain), p_sync in zip(plain.named_parameters(), synced.parameters()):
            torch.testing.assert_close(p_sync.grad, p_plain.grad, atol=ATOL, rtol=1e-5, msg=name)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The checks above passed. This process (DDP + gloo, torch 2.13) then aborted in its C++ teardown at exit in
    # about one run in four here ("terminate called without an active exception", SIGABRT): end it without
    # running static destructors; an assertion failure above still fails the test.
    os._exit(0)


def test_converted_model_under_ddp_matches_whole_batch(port):
    mp.spawn(_ddp_worker, args=(2, port), nprocs=2, join=True)


# Single-process behaviour (no process group): plain BN.

def test_without_dist_behaves_like_batchnorm():
    assert not dist.is_initialized()
    reference = nn.BatchNorm2d(3, momentum=0.2)
    sync = SyncBatchNorm(3, momentum=0.2)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sync(x), reference(x))
    torch.testing.assert_close(sync.running_var, reference.running_var)
    sync.eval(), reference.eval()
    torch.testing.assert_close(sync(x), reference(x))


def test_convert_keeps_parameters_and_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2, momentum=None)))
    with torch.no_grad():
        model[1].weight.uniform_()
        model[1].running_mean.uniform_()
    model[1].num_batches_tracked.fill_(7)
    original = model[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight

    convert_sync_batchnorm(model)

    assert isinstance(model[1], SyncBatchNorm) and isinstance(model[2][0], SyncBatchNorm)
    assert model[2][0].momentum is None and model[1].eps == original.eps
    assert model[1].weight is weight  # optimizers built before the conversion keep working
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, msg=key)


def test_convert_rejects_unavailable_impls():
    model = nn.Sequential(nn.BatchNorm2d(2))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="impl='torch'.*CUDA"):
            convert_sync_batchnorm(model, impl="torch")
    if not _apex_installed():
        with pytest.raises(ImportError, match="NVIDIA apex"):
            convert_sync_batchnorm(model, impl="apex")
    with pytest.raises(ValueError, match="unknown syncbn impl 'nccl'"):
        convert_sync_batchnorm(model, impl="nccl")
    assert isinstance(model[0], nn.BatchNorm2d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convert_to_torch_syncbn_on_cuda():
    model = nn.Sequential(nn.BatchNorm2d(2))
    weight = model[0].weight
    convert_sync_batchnorm(model, impl="torch")
    assert type(model[0]) is nn.SyncBatchNorm and model[0].weight is weight


def test_bn_group_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialized"):
        bn_group(2)


def _apex_installed() -> bool:
    try:
        return importlib.util.find_spec("apex.parallel") is not None
    except ImportError:
        return False
