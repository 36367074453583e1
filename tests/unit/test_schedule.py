"""LR schedules against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rtrain.optim import SCHEDULE_KINDS, LRSchedule, lr_at, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 8192) == pytest.approx(3.2)  # Goyal et al.: batch 8k
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(0.1, 0)


def test_paper_step_decay_cifar():
    # He et al. CIFAR: 0.1, /10 at 32k and 48k, stop at 64k
    schedule = LRSchedule("step", base_lr=0.1, total_steps=64_000, milestones=(32_000, 48_000))
    assert schedule.lr_at(0) == pytest.approx(0.1)
    assert schedule.lr_at(31_999) == pytest.approx(0.1)
    assert schedule.lr_at(32_000) == pytest.approx(0.01)
    assert schedule.lr_at(48_000) == pytest.approx(0.001)
    assert schedule.lr_at(63_999) == pytest.approx(0.001)


def test_warmup_then_step():
    # Goyal et al. shape: 5 "epochs" of warmup from 0.1 to 3.2, then /10 at 30 and 60
    schedule = LRSchedule("step", base_lr=3.2, total_steps=90, warmup_steps=5, milestones=(30, 60),
                          warmup_start_lr=0.1)
    assert [schedule.lr_at(s) for s in range(6)] == pytest.approx([0.1, 0.72, 1.34, 1.96, 2.58, 3.2])
    assert schedule.lr_at(29) == pytest.approx(3.2)
    assert schedule.lr_at(30) == pytest.approx(0.32)
    assert schedule.lr_at(60) == pytest.approx(0.032)
    assert schedule.lr_at(200) == pytest.approx(0.032)


def test_warmup_then_cosine():
    schedule = LRSchedule("cosine", base_lr=1.0, total_steps=14, warmup_steps=4, end_lr=0.1)
    assert schedule.lr_at(2) == pytest.approx(0.5)
    assert schedule.lr_at(4) == pytest.approx(1.0)
    # t = 5 of T = 10: half way, cos = 0
    assert schedule.lr_at(9) == pytest.approx(0.55)
    # t = 2.5 / 10 -> 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert schedule.lr_at(6) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert schedule.lr_at(14) == pytest.approx(0.1)
    assert schedule.lr_at(20) == pytest.approx(0.1)


def test_warmup_then_poly_mlperf():
    # MLPerf LARS shape: warmup, then (1 - t/T)^2 to 1e-4
    schedule = LRSchedule("poly", base_lr=10.0, total_steps=12, warmup_steps=2, end_lr=1e-4, power=2.0)
    assert schedule.lr_at(0) == 0.0
    assert schedule.lr_at(1) == pytest.approx(5.0)
    assert schedule.lr_at(2) == pytest.approx(10.0)
    # t = 5 of T = 10: (0.5)^2 = 0.25
    assert schedule.lr_at(7) == pytest.approx(1e-4 + (10.0 - 1e-4) * 0.25)
    assert schedule.lr_at(11) == pytest.approx(1e-4 + (10.0 - 1e-4) * 0.01)
    assert schedule.lr_at(12) == pytest.approx(1e-4)


def test_constant_with_warmup():
    assert [lr_at(s, "constant", 0.4, 10, warmup_steps=2) for s in (0, 1, 2, 9)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.4])


@pytest.mark.parametrize("kind", sorted(SCHEDULE_KINDS))
def test_every_kind_is_continuous_at_warmup_end_and_pure(kind):
    schedule = LRSchedule(kind, base_lr=2.0, total_steps=50, warmup_steps=10, milestones=(30,), end_lr=0.01)
    assert schedule.lr_at(10) == pytest.approx(2.0)
    assert schedule.lr_at(9) == pytest.approx(1.8)
    lrs = [schedule.lr_at(s) for s in range(60)]
    assert lrs == [schedule.lr_at(s) for s in range(60)]  # no hidden position: a resume sees the same values
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(lrs[10:]))  # never rises after warmup


def test_apply_sets_every_group_with_its_scale():
    params = [torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))]
    opt = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.1}], lr=99.0)
    schedule = LRSchedule("step", base_lr=1.0, total_steps=10, milestones=(5,))
    assert schedule.apply(opt, 6) == pytest.approx(0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "linear"}, "unknown lr schedule kind 'linear'"),
    ({"total_steps": 0}, "total_steps"),
    ({"warmup_steps": 11}, "warmup_steps"),
    ({"milestones": (5, 3)}, "milestones"),
    ({"base_lr": -1.0}, "base_lr"),
])
def test_invalid_configuration_is_rejected(kwargs, match):
    config = {"kind": "step", "base_lr": 0.1, "total_steps": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        LRSchedule(**config)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        LRSchedule("constant", 0.1, 10).lr_at(-1)


def test_constant_warm_start_then_step_decay():
    # He et al.'s ResNet-110 warm start: lr/10 held for the warmup, then the peak, then /10 at a milestone
    schedule = LRSchedule("step", base_lr=0.1, total_steps=30, warmup_steps=2, milestones=(22,),
                          warmup_start_lr=0.01, warmup_shape="constant")
    assert [schedule.lr_at(s) for s in range(4)] == pytest.approx([0.01, 0.01, 0.1, 0.1])
    assert schedule.lr_at(21) == pytest.approx(0.1)
    assert schedule.lr_at(22) == pytest.approx(0.01)
    assert schedule.lr_at(29) == pytest.approx(0.01)
    # a pure function of the step: any order of queries gives the same values
    assert [schedule.lr_at(s) for s in (29, 0, 22, 1, 2)] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.1])


def test_constant_warm_start_from_a_recipe_in_epochs():
    from rtrain.config import ScheduleConfig

    cfg = ScheduleConfig(kind="step", warmup_epochs=2, warmup_start_lr=0.01, warmup_shape="constant",
                         milestones_epochs=[22.5])
    schedule = LRSchedule.from_config(cfg, peak_lr=0.1, steps_per_epoch=10, total_steps=300)
    assert (schedule.warmup_steps, schedule.milestones) == (20, (225,))
    assert schedule.lr_at(19) == pytest.approx(0.01)
    assert schedule.lr_at(20) == pytest.approx(0.1)
    assert schedule.lr_at(225) == pytest.approx(0.01)


def test_unknown_warmup_shape_is_named():
    with pytest.raises(ValueError, match="unknown warmup shape 'cosine'"):
        LRSchedule("step", base_lr=0.1, total_steps=10, warmup_steps=2, warmup_shape="cosine")
