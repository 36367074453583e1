"""StragglerWatch on hand-made window tables: own time (data wait + compute, not collective wait), the
metrics, and a warning per stretch of slow windows naming rank, host and what dominated."""

from __future__ import annotations

import logging

import pytest

from rtrain.tracking.stragglers import StragglerWatch, breakdown, dominated, own_seconds


def _row(rank: int, data: float = 0.0, step: float = 1.0, collective: float = 0.0, steps: int = 2) -> dict:
    return {"rank": rank, "steps": steps, "data_wait_s": data, "step_s": step, "collective_s": collective}


def test_own_time_leaves_out_the_wait_for_the_others():
    fast, slow = _row(0, data=0.0, step=2.0, collective=1.6), _row(1, data=1.6, step=0.4, collective=0.0)
    assert own_seconds(fast) == pytest.approx(0.2) and own_seconds(slow) == 1.0  # per step (2 steps)
    assert dominated(fast) == "collective wait" and dominated(slow) == "data wait"
    assert breakdown(_row(0, step=0.1, collective=0.3))["compute"] == 0.0  # a clock ahead of its step: no negative


def test_a_rank_slow_for_the_set_number_of_windows_is_named_once_per_stretch(caplog):
    named: list[dict] = []
    watch = StragglerWatch(["a", "b", "c"], fraction=0.3, windows=2, on_straggler=named.append)
    even = [_row(0), _row(1), _row(2)]
    slow = [_row(0, collective=0.5), _row(1, collective=0.5), _row(2, step=0.6, data=0.9)]
    with caplog.at_level(logging.WARNING, logger="rtrain.tracking.stragglers"):
        metrics = watch.observe(3, slow)
        assert metrics == {"step_time/p50": 0.25, "step_time/max": 0.75, "step_time/slowest_rank": 2.0}
        assert not named  # one window is not yet a straggler
        watch.observe(6, slow)
        watch.observe(9, slow)  # still slow: no second warning for the same stretch
        watch.observe(12, even)
        watch.observe(15, slow)
        watch.observe(18, slow)  # a new stretch
    assert [(n["straggler"], n["straggler_host"], n["step"], n["dominated"]) for n in named] == \
        [(2, "c", 6, "data wait"), (2, "c", 18, "data wait")]
    assert named[0]["seconds_per_step"] == 0.75 and named[0]["median_s"] == 0.25
    [first, _] = [r.getMessage() for r in caplog.records]
    assert first.startswith("rank 2 on c is a straggler: 0.750 s per step for 2 windows up to step 6, 200% above "
                            "the other ranks' median 0.250 s; data wait dominated (data wait 0.450, compute 0.300")


def test_one_rank_and_idle_ranks_name_nobody():
    watch = StragglerWatch(["a"], fraction=0.3, windows=1)
    assert watch.observe(1, [_row(0)])["step_time/slowest_rank"] == 0.0
    idle = StragglerWatch(["a", "b"], fraction=0.3, windows=1)
    named: list[dict] = []
    idle.on_straggler = named.append
    idle.observe(1, [_row(0, step=0.0), _row(1, step=0.0)])  # a median of 0 is nobody's yardstick
    assert not named
