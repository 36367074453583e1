"""Every rank's structured log: `<run dir>/logs/rank-N.jsonl`, one JSON object per line, appended by every
attempt of the run (a restart adds its lines after the last attempt's). The console keeps rank 0's human
lines; these are for tools: goodput across attempts, per-rank timing, `rtrain status`.

A line: `{"time": unix seconds, "attempt": token, "rank": r, "host": name, "event": name, ...fields}`.
Events: `attempt` (its first record: pid, world size), `start` (set-up and resume done: the step resumed at,
total steps, the job's hosts), `window` (a log window: step, steps, seconds,
data_wait_s: what this rank waited for its loader), `eval` (step, seconds), `checkpoint` (step, blocked_s,
upload seconds/bytes), `stop` (a stop signal's step), `end` (reason: finished / preempted / failed, step,
error), `warning` and `error` (rtrain's own log records at that level: logger, message).

Writing never fails the run: a log that cannot be written (a full disk) is given up with one warning. Text
passes through the same URL redaction as the rest of rtrain's records (no `user:password@` in a log).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rtrain.config.redact import redact_url

LOGS_DIR = "logs"
MAX_TEXT = 2000  # a message longer than this is cut: a log line stays a line a person can read
log = logging.getLogger("rtrain.tracking.events")


def rank_log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / LOGS_DIR / f"rank-{rank}.jsonl"


class EventLog:
    """Appends this rank's events; `handler()` mirrors rtrain's warnings and errors into it."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, attempt: str, host: str | None = None) -> None:
        self.path = rank_log_path(run_dir, rank)
        self.rank, self.attempt = rank, attempt
        self.host = host or socket.gethostname()
        self._lock = threading.Lock()
        self._file: Any = None
        self.observers: list[Callable[[dict[str, Any]], None]] = []  # told every record of this attempt
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run's length
        except OSError as error:
            self._give_up(error)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "attempt": self.attempt, "rank": self.rank, "host": self.host,
                  "event": event, **{key: _plain(value) for key, value in fields.items()}}
        line = json.dumps(record, allow_nan=False, default=str) + "\n"
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(line)
                    self._file.flush()  # a reader (rtrain status) sees each line once written; no fsync per line
                except (OSError, ValueError) as error:
                    self._give_up(error)
        for observer in self.observers:
            observer(record)

    def handler(self, level: int = logging.WARNING) -> logging.Handler:
        return _EventHandler(self, level)

    @contextmanager
    def mirroring(self, logger: str = "rtrain") -> Iterator[EventLog]:
        """rtrain's warnings and errors written here too while the block runs."""
        handler = self.handler()
        logging.getLogger(logger).addHandler(handler)
        try:
            yield self
        finally:
            logging.getLogger(logger).removeHandler(handler)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None

    def _give_up(self, error: BaseException) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        log.warning("%s: not written any more (%s: %s); training goes on", self.path, type(error).__name__, error)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _EventHandler(logging.Handler):
    def __init__(self, events: EventLog, level: int) -> None:
        super().__init__(level)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == log.name:  # its own giving up: never written into the log it gave up
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the caller's; the record still counts
            message = str(record.msg)
        self.events.emit(record.levelname.lower(), logger=record.name, message=message)


def _plain(value: Any) -> Any:
    """JSON-safe, bounded, redacted: a non-finite float is null, a long text is cut."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        return redact_url(value[:MAX_TEXT])
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int)):
        return value
    return _plain(str(value))


def read_events(path: str | os.PathLike, max_bytes: int = 256 << 20) -> list[dict[str, Any]]:
    """A rank's events, oldest first; a torn last line (a rank killed mid-write) and lines that are not
    events are skipped. Only the last `max_bytes` of a larger log are read."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                file.seek(size - max_bytes)
                file.readline()  # the first, partial line
            data = file.read(max_bytes)
    except FileNotFoundError:
        return []
    events = []
    for line in data.splitlines():
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str) and isinstance(event.get("time"),
                                                                                           (int, float)):
            events.append(event)
    return events
