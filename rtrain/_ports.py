"""A TCP port to hand to a server that starts later (torch's rendezvous, a Ray head's extra services, a test's
MLflow or S3). Standard library only: every layer of rtrain, cluster/ and the tests may import this.

Picking with bind(port 0) and handing the number on is a race with the whole machine: the kernel gives port-0
binds *and every outgoing connection's local end* a port from its ephemeral range, so on a busy host (Ray opens
hundreds of connections) the number is often taken again before the server binds it. Seen for real: a Ray head's
client server failed with "Address already in use" on a port picked that way, the head died, the job hung. So
the port is drawn from below the ephemeral range (and above Ray's default worker ports, 10002-19999, and the
GCS ports rtrain.sbatch derives from the job id, 20000-29999), where nothing is handed out automatically, and
checked free. Where the range cannot be read or leaves no room, it falls back to port 0.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import tempfile
import time

LOOPBACK = "127.0.0.1"
QUIET_LOW = 30000  # first port drawn from
_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
_TRIES = 64


def ephemeral_range() -> tuple[int, int] | None:
    """The kernel's range for automatic ports, (low, high) inclusive; None where it cannot be read."""
    try:
        with open(_EPHEMERAL) as f:
            low, high = (int(part) for part in f.read().split()[:2])
        return low, high
    except (OSError, ValueError):
        return None


def _quiet_span() -> tuple[int, int] | None:
    span = ephemeral_range()
    if span is None:
        return None
    low, high = span
    if low - 1 >= QUIET_LOW + 16:
        return QUIET_LOW, low - 1
    if high < 65535 - 16:
        return max(high + 1, QUIET_LOW), 65535
    return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:  # no SO_REUSEADDR: a port still in TIME_WAIT counts as taken
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


RESERVE_S = 600.0  # a port handed out is not handed out again by this user's processes for this long


def _reserve(port: int) -> bool:
    """Claim `port` among this user's processes (a file per port under /tmp, O_EXCL): between being picked
    and being bound a port is free to everyone, and two pickers drawing the same one (a test's MLflow and a
    Ray head's agent, one CI run) collided. False when another process claimed it within RESERVE_S."""
    folder = os.path.join(tempfile.gettempdir(), f"rtrain-ports-u{os.geteuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return True  # no shared place to claim in: the bind check alone
    try:
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return True
        path = os.path.join(folder, str(port))
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            return True
        except FileExistsError:
            if time.time() - os.lstat(path).st_mtime < RESERVE_S:
                return False
            os.utime(path, follow_symlinks=False)  # an old claim: take it over
            return True
    except OSError:
        return True


def unused_port(host: str = LOOPBACK) -> int:
    """A port on `host` that is free now, that the kernel does not hand out on its own, and that no other
    process of this user was given in the last RESERVE_S."""
    span = _quiet_span()
    if span is not None:
        draw = random.SystemRandom()
        for _ in range(_TRIES):
            port = draw.randint(*span)
            # Free on `host` and on every address: a server (torch's TCPStore) may listen on all of them.
            if _bindable(host, port) and (host == "" or _bindable("", port)) and _reserve(port):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
