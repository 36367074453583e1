"""Optimizers (SGD, multi-tensor LARS and LAMB, AdamW), weight-decay parameter groups, lr schedules."""

from rtrain.optim.factory import IMPLS, OPTIMIZERS, build_optimizer, optimizer_from_config, param_groups
from rtrain.optim.lamb import LAMB
from rtrain.optim.lars import LARS
from rtrain.optim.schedule import SCHEDULE_KINDS, LRSchedule, lr_at, scaled_lr

__all__ = [
    "IMPLS",
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "SCHEDULE_KINDS",
    "LRSchedule",
    "build_optimizer",
    "lr_at",
    "optimizer_from_config",
    "param_groups",
    "scaled_lr",
]
