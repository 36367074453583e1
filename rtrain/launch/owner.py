"""One run, one owner: the launch that trains a run holds its run directory's lock for as long as it runs.

The lock is a POSIX record lock (fcntl) on `<run dir>/.owner.lock`, held by the launcher process: NFSv4 and
Lustre (mounted with -o flock) carry it between hosts, and the kernel (or the file server's lease) releases it
however the owner ends, SIGKILL and a lost node included, so the next launch takes over a dead owner's run
without anyone cleaning up. Beside it `owner.json` says who holds it (host, PID, since when), for
the refusal a second launch prints, and is removed when the owner ends cleanly; a leftover one only tells the
next owner whom it takes over from.

Who is the owner: the launcher (`python -m rtrain.launch`: the local launcher, or the Ray driver, whose Ray
Train restarts are its own); a requeued SLURM job is a new launcher after the old one exited. In a multi-node
local launch (rtrain-srun.sbatch) node 0's launcher holds it; the others are parts of that launch.
On a filesystem without record locks the run goes on with a warning: two launches are then not prevented.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
import time
from pathlib import Path

from rtrain.launch.errors import LaunchError

LOCK_NAME = ".owner.lock"
OWNER_NAME = "owner.json"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunInUse(LaunchError):
    """Another live launch owns the run directory."""

    exit_code = 1


def _plain(value: object, limit: int = 100) -> str:
    """A value from owner.json (anyone who can write the run directory can write it) as printable text."""
    text = str(value)[:limit]
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _describe(owner: dict) -> str:
    since = owner.get("since")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    except (TypeError, ValueError, OverflowError, OSError):
        when = "?"
    return f"host {_plain(owner.get('host', '?'))}, pid {_plain(owner.get('pid', '?'), 20)}, since {when}"


class RunLock:
    """`with RunLock(run_dir):` the calling process owns the run directory, or RunInUse is raised at once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self.took_over_from: str | None = None  # the previous owner that ended without releasing, if any
        self.supported = True

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                owner = self._owner() or {}
                raise RunInUse(
                    f"run directory {self.run_dir} is in use by another launch ({_describe(owner)}): one run "
                    f"trains in one launch at a time; wait for it to end, stop it (kill -TERM {owner.get('pid', '?')} "
                    "on its host: it checkpoints), or pick another run.name") from None
            if exc.errno in _UNSUPPORTED:
                self.supported = False
                print(f"rtrain: warning: {self.run_dir} cannot hold a lock ({os.strerror(exc.errno)}): a second "
                      "launch of this run would not be refused", file=sys.stderr, flush=True)
                return self
            raise
        self._fd = fd
        try:
            previous = self._owner()
            if previous and (previous.get("host") != socket.gethostname() or previous.get("pid") != os.getpid()):
                self.took_over_from = _describe(previous)
            self._write_owner()
        except BaseException:
            self._fd = None
            os.close(fd)  # never keep the lock of a launch that did not start
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # releases the record lock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _owner(self) -> dict | None:
        """owner.json if it is a small regular file holding a JSON object (never blocks on a FIFO)."""
        try:
            fd = os.open(self.run_dir / OWNER_NAME, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = json.loads(os.read(fd, 65536))
            return raw if isinstance(raw, dict) else None
        except (OSError, ValueError, RecursionError):
            return None
        finally:
            os.close(fd)

    def _write_owner(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}  # no command line:
        # its overrides may carry credentials
        temp = self.run_dir / f".{OWNER_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner))
        os.replace(temp, self.run_dir / OWNER_NAME)
