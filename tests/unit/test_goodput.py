"""The ranks' structured logs (rtrain.tracking.events) and goodput across attempts (rtrain.tracking.goodput):
what a log holds, what a reader skips, and how the wall time splits into productive steps and named losses."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from rtrain.tracking.events import EventLog, rank_log_path, read_events
from rtrain.tracking.goodput import GoodputMeter, attempt_tags, attempts_of, summarize


def _attempt(token: str, t0: float, resumed: int, windows: list[tuple[int, float, float]], end: str | None,
             evals: float = 0.0, blocked: float = 0.0) -> list[dict]:
    """Records of one attempt starting at t0: set-up 2 s, then windows of 2 steps (step, step_s, data_wait)."""
    records = [{"time": t0, "attempt": token, "event": "attempt", "host": "a"},
               {"time": t0 + 2, "attempt": token, "event": "start", "step": resumed, "hosts": ["a", "b"]}]
    now = t0 + 2
    for step, step_s, wait in windows:
        now += step_s + wait
        records.append({"time": now, "attempt": token, "event": "window", "step": step, "steps": 2,
                        "step_s": step_s, "data_wait_s": wait})
    if blocked:
        now += blocked
        records.append({"time": now, "attempt": token, "event": "checkpoint", "blocked_s": blocked})
    if evals:
        now += evals
        records.append({"time": now, "attempt": token, "event": "eval", "seconds": evals})
    if end:
        records.append({"time": now, "attempt": token, "event": "end", "reason": end, "signal": None})
    return records


def test_a_killed_and_resumed_run_splits_its_wall_time_into_goodput_and_named_losses():
    first = _attempt("a1", 100.0, 0, [(2, 1.0, 0.5), (4, 1.0, 0.0), (6, 1.0, 0.0)], end=None, blocked=0.25)
    # killed after step 6 (its last record at 105.75); down for 10 s; resumed from the checkpoint of step 4
    second = _attempt("a2", 115.75, 4, [(6, 1.0, 0.0), (8, 1.0, 0.0)], end="finished", evals=0.5)
    figures = summarize(first + second)
    assert figures["lost/restart"] == pytest.approx(10.0)
    assert figures["lost/startup"] == pytest.approx(4.0)  # 2 s per attempt
    assert figures["lost/recomputed"] == pytest.approx(1.0)  # steps 5-6 of the first attempt ran again
    assert figures["lost/data_wait"] == pytest.approx(0.5)
    assert figures["lost/checkpoint_blocking"] == pytest.approx(0.25)
    assert figures["lost/eval"] == pytest.approx(0.5)
    assert figures["goodput/productive_s"] == pytest.approx(4.0)
    assert figures["goodput/wall_s"] == pytest.approx(120.25 - 100.0)
    assert figures["goodput"] == pytest.approx(4.0 / 20.25)
    assert figures["lost/unaccounted"] == pytest.approx(0.0, abs=1e-9)  # every second of this log is measured
    assert [a.reason for a in attempts_of(first + second)] == ["killed", "finished"]
    tags = attempt_tags(attempts_of(first + second))
    assert tags["rtrain.attempt.1"].startswith("killed; 1970-01-01T00:01:40Z to ") and "steps 0-6" in tags[
        "rtrain.attempt.1"] and tags["rtrain.attempt.1"].endswith("hosts a,b")
    assert tags["rtrain.attempt.2"].startswith("finished; ") and "steps 4-8" in tags["rtrain.attempt.2"]


def test_the_live_meter_agrees_with_the_whole_log():
    first = _attempt("a1", 100.0, 0, [(2, 1.0, 0.5), (4, 1.0, 0.0), (6, 1.0, 0.0)], end="preempted")
    second = _attempt("a2", 110.0, 6, [(8, 1.0, 0.25), (10, 1.0, 0.0)], end="finished", evals=0.5, blocked=0.1)
    meter = GoodputMeter(first)
    for record in second:
        meter.observe(record)
    live, whole = meter.figures(), summarize(first + second)
    assert live.keys() == whole.keys()
    for key in whole:
        assert live[key] == pytest.approx(whole[key]), key
    assert [a.token for a in meter.attempts] == ["a1"] and meter.current.token == "a2"


def test_an_event_log_appends_every_attempt_redacts_and_never_fails_the_run(tmp_path, caplog):
    with EventLog(tmp_path, 1, "first", host="h") as events, events.mirroring():
        events.emit("window", step=3, seconds=math.inf, loss=math.nan, note="x" * 5000)
        logging.getLogger("rtrain.data").warning("cannot read s3://user:hunter2@bucket/shard-000001.tar")
        logging.getLogger("rtrain.data").info("not an event")
    with EventLog(tmp_path, 1, "second", host="h") as events:
        events.emit("end", reason="finished")
    path = rank_log_path(tmp_path, 1)
    with open(path, "a") as file:
        file.write('{"time": 1, "event": "torn')  # a rank killed mid-line
    records = read_events(path)
    assert [(r["attempt"], r["event"]) for r in records] == [("first", "window"), ("first", "warning"),
                                                             ("second", "end")]
    window, warning = records[0], records[1]
    assert window["seconds"] is None and window["loss"] is None and len(window["note"]) == 2000
    assert window["rank"] == 1 and window["host"] == "h" and isinstance(window["time"], float)
    assert "hunter2" not in path.read_text() and "s3://***@bucket" in warning["message"]
    assert warning["logger"] == "rtrain.data"

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        broken = EventLog(blocked, 0, "x")  # its folder cannot be made: one warning, then nothing
        broken.emit("window", step=1)
    assert "not written any more" in caplog.text and "training goes on" in caplog.text
    assert read_events(tmp_path / "nothing.jsonl") == []


def test_a_log_larger_than_the_reading_bound_is_read_from_its_end(tmp_path):
    path = tmp_path / "rank-0.jsonl"
    lines = [json.dumps({"time": float(i), "event": "window", "step": i}) for i in range(2000)]
    path.write_text("\n".join(lines) + "\n")
    tail = read_events(path, max_bytes=10_000)
    assert tail and tail[-1]["step"] == 1999 and tail[0]["step"] > 1000
    assert [r["step"] for r in tail] == list(range(tail[0]["step"], 2000))
    assert Path(path).stat().st_size > 10_000


from hypothesis import given, settings, strategies as st  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=60) | _json.map(lambda v: json.dumps(v).encode()), max_size=12))
def test_any_bytes_in_a_log_read_as_events_or_skipped_and_summarize_never_raises(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("log") / "rank-0.jsonl"
    path.write_bytes(b"\n".join(lines))
    records = read_events(path)
    assert all(isinstance(r["event"], str) and isinstance(r["time"], (int, float)) for r in records)
    summarize([r for r in records if math.isfinite(r["time"])])
