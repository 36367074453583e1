"""The data-parallel side of a run, built from its recipe sections: the model placed and synchronized,
and the backend (DDP or DeepSpeed) that steps it."""

from __future__ import annotations

import torch
from torch import nn

from rtrain.config import DistConfig, PrecisionConfig, TrainConfig
from rtrain.distributed.backend import Backend, DDPBackend
from rtrain.distributed.scaler import build_scaler
from rtrain.distributed.syncbn import convert_sync_batchnorm
from rtrain.distributed.waits import CollectiveClock


def place_model(model: nn.Module, cfg: DistConfig, world_size: int, device: torch.device,
                channels_last: bool = False, clock: CollectiveClock | None = None) -> nn.Module:
    """Synchronized BN across ranks (dist.syncbn), then onto the device in its memory format. A `clock`
    adds up what SyncBN's all_reduces waited (rtrain.distributed.waits)."""
    if cfg.syncbn != "off" and world_size > 1:
        model = convert_sync_batchnorm(model, impl=cfg.syncbn, group_size=cfg.bn_group_size, clock=clock)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=memory_format)


def backend_from_config(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *,
                        dist: DistConfig, precision: PrecisionConfig, train: TrainConfig,
                        micro_batch: int, clock: CollectiveClock | None = None) -> Backend:
    """dist.engine's backend; precision.* picks its loss scaling, train.* its clipping/accumulation/compile.
    A `clock` adds up DDP's gradient wait (DeepSpeed's is not timed)."""
    if dist.engine == "deepspeed":
        from rtrain.distributed.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(
            model, optimizer, device=device, precision_dtype=precision.dtype,
            fp16_dynamic=precision.scaler == "dynamic", init_scale=precision.init_scale,
            growth_interval=precision.growth_interval, static_scale=precision.static_scale,
            zero_stage=dist.zero_stage, micro_batch_per_gpu=micro_batch,
            accumulation_steps=train.accumulation_steps, clip_grad_norm=train.clip_grad_norm)
    return DDPBackend(model, optimizer, build_scaler(precision, device), device=device,
                      clip_grad_norm=train.clip_grad_norm, bucket_cap_mb=dist.bucket_cap_mb,
                      static_graph=dist.static_graph, compile_model=train.compile, clock=clock)
