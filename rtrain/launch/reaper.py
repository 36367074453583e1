"""Nothing outlives the launcher: a small guard process that kills what the launcher started once it is gone.

The Ray that the launcher starts for itself (`ray.init()` without an address) is mostly torn down by Ray
when the driver dies, but not all of it: after a SIGKILL (or the OOM killer) `ray::DashboardAgent` and
`ray::RuntimeEnvAgent` stay, reparented to init. The guard runs in its own session, holds the read end of
a pipe whose only write end is the launcher's, and records the launcher's process tree every
`SNAPSHOT_S` (only processes started after the guard: whatever ran before the block is not its business).
When the pipe closes (the launcher exited, however), it SIGKILLs every recorded process that
is still the same process (PID and start time) and their descendants.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SNAPSHOT_S = 1.0
GUARD_ENTRY = "import sys; from rtrain.launch.reaper import guard_main; sys.exit(guard_main(int(sys.argv[1])))"

Process = tuple[int, int]  # (pid, start time in clock ticks since boot): a PID alone can be reused


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _table() -> dict[int, tuple[int, int]]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[Process]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, frontier = set(), list(roots)
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.add((child, table[child][1]))
            frontier.append(child)
    return found


def kill_recorded(recorded: set[Process]) -> int:
    """SIGKILL each recorded process that still runs (same start time) and everything below it."""
    table = _table()
    still = {pid for pid, started in recorded if pid in table and table[pid][1] == started}
    victims = {pid for pid, _ in descendants(still, table)} | still
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


def guard_main(launcher_pid: int) -> int:
    """Body of the guard process; stdin is the pipe from the launcher."""
    recorded: set[Process] = set()
    me = (os.getpid(), _stat(os.getpid())[1])
    fd = sys.stdin.fileno()
    while True:
        if _stat(launcher_pid) is not None:
            recorded |= {p for p in descendants({launcher_pid}, _table()) if p[1] >= me[1] and p != me}
        ready, _, _ = select.select([fd], [], [], SNAPSHOT_S)
        if ready and not os.read(fd, 64):  # EOF: the launcher is gone
            break
    kill_recorded(recorded)
    return 0


@contextmanager
def guarded() -> Iterator[None]:
    """Run the block with a guard watching this process (Linux; a no-op where /proc is missing)."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    read_end, write_end = os.pipe()
    guard = subprocess.Popen([sys.executable, "-c", GUARD_ENTRY, str(os.getpid())], stdin=read_end,
                             start_new_session=True, close_fds=True)
    os.close(read_end)
    os.set_inheritable(write_end, False)  # only this process may hold it, or EOF never comes
    try:
        yield
    finally:
        os.close(write_end)
        guard.wait()
