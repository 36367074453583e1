"""Background service processes owned through a PID file: start detached, wait until ready, stop by PID.

Each service runs in its own session (process group), so stopping it also ends the helpers it forked
(MLflow's uvicorn workers, Ray's raylet and GCS) and nothing else on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ServiceError(RuntimeError):
    """A local service failed to start or stop; the message names the service, its PID file and log."""


def private_dir(path: str | Path, owners: Sequence[int] = ()) -> Path:
    """A helper's state folder that only this user can enter: made 0700 when missing; an existing one must be a
    real folder (a symlink is never followed) owned by this user (or one of `owners`), and is set to 0700 when it
    is this user's. Anything else is refused by name: a folder of another user under /tmp could hold a planted
    PID file (a process to kill) or a symlink that redirects a write."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:  # the folder itself, never what a symlink in its place points to (checked and changed through one fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ServiceError(f"{path} is a symlink or not a folder ({os.strerror(exc.errno)}): refusing to keep a "
                           "service's state there (remove it if it is yours)") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() and info.st_uid not in owners:
            raise ServiceError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}): "
                               "refusing to keep a service's state there; pick another folder")
        if info.st_mode & 0o022:  # others could have put files in it already
            raise ServiceError(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}): refusing "
                               "to trust what is in it; remove it or pick another folder")
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def spawn_detached(argv: Sequence[str], log_path: Path, pid_file: Path,
                   env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start argv in a new session with output to log_path, and record its PID in pid_file."""
    existing = read_pid(pid_file)
    if existing is not None and pid_alive(existing):
        raise ServiceError(f"{pid_file}: a service with PID {existing} is already running; stop it first")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=dict(env) if env is not None else None)
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise ServiceError(f"{pid_file}: not a PID file (content {text[:40]!r})")
    return int(text)


def pid_alive(pid: int) -> bool:
    """True while pid runs; reaps it first if it is our own exited child (a zombie would look alive)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], bool],
               log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise ServiceError(f"{what} exited during start-up; last log lines of {log_path}:\n{log_tail(log_path)}")
        time.sleep(0.5)
    raise ServiceError(f"{what} not ready after {timeout_s:.0f} s; last log lines of {log_path}:\n{log_tail(log_path)}")


def log_tail(log_path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop_by_pid_file(pid_file: Path, expect_in_cmdline: str, grace_s: float = 20.0) -> bool:
    """SIGTERM the service's process group, SIGKILL it after grace_s; False when nothing was running.

    The PID must still belong to the expected program (PIDs get reused), else the stale file is removed.
    """
    pid = read_pid(pid_file)
    if pid is None:
        return False
    if not pid_alive(pid) or expect_in_cmdline not in pid_cmdline(pid):
        pid_file.unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    # Helpers that outlive the leader (or a leader ignoring SIGTERM) are killed with the whole group.
    _signal_group(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    return True
