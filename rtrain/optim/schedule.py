"""Learning rate as a pure function of the optimizer step.

Nothing here keeps a position: the caller passes the step (``TrainState`` owns it), so a resumed run gets
exactly the lr of an uninterrupted one. Steps count optimizer updates from 0.

Warmup (Goyal et al., 2017) is linear from ``warmup_start_lr`` at step 0 to ``base_lr`` at ``warmup_steps``;
with ``warmup_shape="constant"`` it is ``warmup_start_lr`` for every warmup step instead (He et al.'s warm
start of ResNet-110 at 0.01 before 0.1). After it, the decay kind applies:

- ``constant``: ``base_lr``.
- ``step``: ``base_lr * gamma ** (number of milestones <= step)``; milestones are absolute steps
  (the paper: ÷10 at 32k and 48k iterations).
- ``cosine``: ``end_lr + (base_lr - end_lr) * (1 + cos(pi * t / T)) / 2``.
- ``poly``: ``end_lr + (base_lr - end_lr) * (1 - t / T) ** power`` (MLPerf LARS: power 2, end 1e-4).

where ``t = step - warmup_steps`` and ``T = total_steps - warmup_steps`` (the decay runs over the steps after
warmup). Past ``total_steps`` the decayed kinds stay at their final value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from rtrain.config import ScheduleConfig


def scaled_lr(base_lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): lr = base * global_batch / 256."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    return base_lr_per_256 * global_batch / 256


@dataclass(frozen=True)
class _DecayArgs:
    base_lr: float
    step: int
    decay_step: int
    decay_steps: int
    milestones: tuple[int, ...]
    gamma: float
    end_lr: float
    power: float


def _constant(a: _DecayArgs) -> float:
    return a.base_lr


def _step_decay(a: _DecayArgs) -> float:
    return a.base_lr * a.gamma ** bisect.bisect_right(a.milestones, a.step)


def _decay_progress(a: _DecayArgs) -> float:
    if a.decay_steps <= 0:
        return 1.0
    return min(a.decay_step / a.decay_steps, 1.0)


def _cosine(a: _DecayArgs) -> float:
    return a.end_lr + (a.base_lr - a.end_lr) * 0.5 * (1.0 + math.cos(math.pi * _decay_progress(a)))


def _poly(a: _DecayArgs) -> float:
    return a.end_lr + (a.base_lr - a.end_lr) * (1.0 - _decay_progress(a)) ** a.power


WARMUP_SHAPES = ("linear", "constant")

SCHEDULE_KINDS: Mapping[str, Callable[[_DecayArgs], float]] = MappingProxyType({
    "constant": _constant,
    "step": _step_decay,
    "cosine": _cosine,
    "poly": _poly,
})


def lr_at(
    step: int,
    kind: str,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    end_lr: float = 0.0,
    power: float = 2.0,
    warmup_start_lr: float = 0.0,
    warmup_shape: str = "linear",
) -> float:
    """The learning rate at optimizer step ``step`` (see the module docstring for each kind)."""
    _validate(kind, base_lr, total_steps, warmup_steps, milestones, warmup_shape)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps and warmup_shape == "constant":
        return warmup_start_lr
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    args = _DecayArgs(base_lr=base_lr, step=step, decay_step=step - warmup_steps,
                      decay_steps=total_steps - warmup_steps, milestones=tuple(milestones),
                      gamma=gamma, end_lr=end_lr, power=power)
    return SCHEDULE_KINDS[kind](args)


def _validate(kind: str, base_lr: float, total_steps: int, warmup_steps: int, milestones: Sequence[int],
              warmup_shape: str = "linear") -> None:
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown lr schedule kind '{kind}'; known: {sorted(SCHEDULE_KINDS)}")
    if warmup_shape not in WARMUP_SHAPES:
        raise ValueError(f"unknown warmup shape '{warmup_shape}'; known: {list(WARMUP_SHAPES)}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")


@dataclass(frozen=True)
class LRSchedule:
    """A validated schedule configuration; ``lr_at(step)`` and ``apply(optimizer, step)`` are pure in step."""

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    end_lr: float = 0.0
    power: float = 2.0
    warmup_start_lr: float = 0.0
    warmup_shape: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        _validate(self.kind, self.base_lr, self.total_steps, self.warmup_steps, self.milestones, self.warmup_shape)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, peak_lr: float, steps_per_epoch: int, total_steps: int) -> LRSchedule:
        """The recipe's schedule section in steps: epoch-given warmup and milestones become step counts."""
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
        milestones = cfg.milestones_steps if cfg.milestones_steps is not None else [
            round(epoch * steps_per_epoch) for epoch in cfg.milestones_epochs]
        return cls(kind=cfg.kind, base_lr=peak_lr, total_steps=total_steps, warmup_steps=min(warmup, total_steps),
                   milestones=tuple(milestones), gamma=cfg.gamma, end_lr=cfg.end_lr, power=cfg.power,
                   warmup_start_lr=cfg.warmup_start_lr, warmup_shape=cfg.warmup_shape)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.kind, self.base_lr, self.total_steps, self.warmup_steps, self.milestones,
                     self.gamma, self.end_lr, self.power, self.warmup_start_lr, self.warmup_shape)

    def apply(self, optimizer: Any, step: int) -> float:
        """Set every param group's lr for ``step`` (times the group's optional ``lr_scale``); return the lr."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
