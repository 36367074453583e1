"""No crash loop: a shard or sample that stalled or killed a rank twice is left out of the rest of the run.

Every slot reader (a loader worker process, or the rank itself with num_workers 0) marks what it is doing in a
small shared file, `reading-<rank>.bin` in the attempt's folder: the shard it is reading and the sample it is
decoding, one int64 store each (a memory write to a MAP_SHARED page: nothing measurable per sample, and the
page outlives a process killed in the middle of a decode). The rank marks which slot's batch it waits for.

When a rank's loader stalls (data.loader_timeout_s) or one of its worker processes dies, the rank appends what
that slot was on to `<run dir>/suspects.jsonl` (attempt, rank, shard, sample, why) before it fails; the stall
watchdog does the same for a rank it finds stuck waiting for data (rtrain.launch.worker wires it). A later
start of the run (a requeue, a Ray restart, a rerun) quarantines every shard or sample recorded by two
different attempts: it is not read or decoded again in this run, counted as skipped (whatever
data.on_bad_sample says: the point is that the requeued job makes progress), and named in the log and in the
MLflow tag `rtrain.quarantined`. A sample is suspected when the slot was decoding it, its whole shard when
the slot was reading the shard's bytes. Deleting suspects.jsonl lifts the quarantine.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUSPECTS_FILE = "suspects.jsonl"
MAX_SUSPECTS_BYTES = 4 << 20  # a record is ~150 bytes; a file larger than this is read from its end only
NONE = -1


def marks_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"reading-{rank:05d}.bin"


class ReadingMarks:
    """int64 words in a shared file: [awaited slot, then (shard index, sample id) per slot]; -1 when none."""

    def __init__(self, path: Path, slots: int, create: bool = False):
        self.path, self.slots = Path(path), slots
        size = (1 + 2 * slots) * 8
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags |= os.O_CREAT | os.O_TRUNC
        fd = os.open(self.path, flags, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{self.path}: not a regular file")
            if create:
                os.write(fd, np.full(1 + 2 * slots, NONE, dtype=np.int64).tobytes())
            if os.fstat(fd).st_size != size:
                raise ValueError(f"{self.path}: {os.fstat(fd).st_size} bytes, expected {size} for {slots} slot(s)")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.words = np.frombuffer(self._map, dtype=np.int64)

    @classmethod
    def attach(cls, path: Path) -> ReadingMarks:
        """Another rank's marks (the stall watchdog reads a stalled rank's); slots from the file's size."""
        size = os.stat(path, follow_symlinks=False).st_size
        if size < 24 or size % 16 != 8:
            raise ValueError(f"{path}: {size} bytes is not a marks file")
        return cls(path, (size // 8 - 1) // 2)

    def awaiting(self, slot: int) -> None:
        self.words[0] = slot

    def reading(self, slot: int, shard_index: int) -> None:
        self.words[1 + 2 * slot] = shard_index
        self.words[2 + 2 * slot] = NONE

    def decoding(self, slot: int, sample_id: int) -> None:
        self.words[2 + 2 * slot] = sample_id

    def idle(self, slot: int) -> None:
        self.words[1 + 2 * slot] = NONE
        self.words[2 + 2 * slot] = NONE

    def on(self, slot: int | None = None) -> tuple[int, int]:
        """(shard index, sample id) of `slot` (default: the awaited one); (-1, -1) when it marked nothing."""
        slot = int(self.words[0]) if slot is None else slot
        if not 0 <= slot < self.slots:
            return NONE, NONE
        return int(self.words[1 + 2 * slot]), int(self.words[2 + 2 * slot])

    def __getstate__(self) -> dict:  # crosses into worker processes by path: each maps the file itself
        return {"path": str(self.path), "slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["path"]), state["slots"])


@dataclass(frozen=True)
class Suspect:
    shard: str
    sample: int | None  # position in the shard; None: the shard itself (it hung or died while being read)

    def describe(self) -> str:
        return f"shard {self.shard}" + ("" if self.sample is None else f" sample #{self.sample}")


def suspect_from_marks(marks: ReadingMarks, shard_names: list[str], offsets: np.ndarray,
                       slot: int | None = None) -> Suspect | None:
    shard_index, sample_id = marks.on(slot)
    if not 0 <= shard_index < len(shard_names):
        return None
    if sample_id == NONE:
        return Suspect(shard_names[shard_index], None)
    index = int(np.searchsorted(offsets, sample_id, side="right")) - 1
    if not 0 <= index < len(shard_names):
        return None
    return Suspect(shard_names[index], int(sample_id - offsets[index]))


def record(run_dir: Path, attempt: str, rank: int, suspect: Suspect, why: str) -> None:
    """Append one record (one write of one line: whole even when ranks append at once)."""
    line = json.dumps({"attempt": attempt, "rank": rank, "shard": suspect.shard, "sample": suspect.sample,
                       "why": why[:300]}) + "\n"
    fd = os.open(Path(run_dir) / SUSPECTS_FILE,
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{Path(run_dir) / SUSPECTS_FILE}: not a regular file")
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _records(run_dir: Path) -> Iterable[dict]:
    path = Path(run_dir) / SUSPECTS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return []
        os.lseek(fd, max(0, info.st_size - MAX_SUSPECTS_BYTES), os.SEEK_SET)
        text = os.read(fd, MAX_SUSPECTS_BYTES).decode(errors="replace")
    except OSError:
        return []
    finally:
        os.close(fd)
    found = []
    for line in text.splitlines():
        if len(line) > 4096:
            continue  # records are ~150 bytes
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a torn or edited line: not evidence
        if isinstance(item, dict) and isinstance(item.get("shard"), str) and isinstance(item.get("attempt"), str):
            sample = item.get("sample")
            if sample is None or (isinstance(sample, int) and not isinstance(sample, bool) and sample >= 0):
                found.append(item)
    return found


@dataclass(frozen=True)
class Quarantine:
    shards: frozenset[str] = frozenset()
    samples: frozenset[tuple[str, int]] = frozenset()  # (shard, position)

    def __bool__(self) -> bool:
        return bool(self.shards or self.samples)

    def names(self) -> list[str]:
        return sorted([Suspect(s, None).describe() for s in self.shards]
                      + [Suspect(s, p).describe() for s, p in self.samples])


def quarantine_of(run_dir: Path | None, repeats: int = 2, counts: dict[str, int] | None = None) -> Quarantine:
    """What this run leaves out: every suspect recorded by `repeats` or more different attempts (with `counts`,
    shard name -> samples from the manifest, only shards and positions that exist)."""
    if run_dir is None:
        return Quarantine()
    attempts: dict[Suspect, set[str]] = {}
    for item in _records(run_dir):
        shard, sample = item["shard"], item.get("sample")
        if counts is not None and (shard not in counts or (sample is not None and sample >= counts[shard])):
            continue
        attempts.setdefault(Suspect(shard, sample), set()).add(item["attempt"])
    chosen = [s for s, seen in attempts.items() if len(seen) >= repeats]
    return Quarantine(frozenset(s.shard for s in chosen if s.sample is None),
                      frozenset((s.shard, s.sample) for s in chosen if s.sample is not None))


@dataclass(frozen=True)
class CrashGuard:
    """What a rank's loader needs to mark, record and leave out (rtrain.launch.worker builds it)."""

    run_dir: Path
    folder: Path  # the attempt's folder (marks live there)
    attempt: str
    rank: int

    def record_stalled(self, rank: int, shard_names: list[str], offsets: np.ndarray, why: str) -> Suspect | None:
        """What a stalled rank's awaited slot was on, written down; None when it marked nothing."""
        try:
            marks = ReadingMarks.attach(marks_path(self.folder, rank))
        except (OSError, ValueError):
            return None
        suspect = suspect_from_marks(marks, shard_names, offsets)
        if suspect is not None:
            record(self.run_dir, self.attempt, rank, suspect, why)
        return suspect
