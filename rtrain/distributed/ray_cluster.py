"""Connect to a Ray cluster, or start a private local one, for the launcher and for data_prep; watch that
its head still answers (HeadWatch).

Ray is imported only when called: importing this module stays cheap.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rtrain._ports import LOOPBACK, unused_port


def _free_port() -> int:
    return unused_port(LOOPBACK)


def connect_or_start_ray(address: str | None, num_cpus: int, runtime_env: dict[str, Any] | None = None) -> bool:
    """Connect to the cluster at `address`, else at RAY_ADDRESS (set inside `ray job submit`), else start
    a local Ray with `num_cpus` CPUs. True when this call did the ray.init and so owns the shutdown; False
    when Ray was already initialized (the caller's session: tests, notebooks).

    A local Ray gets its dashboard on a free port of 127.0.0.1: it serves the state API that Ray Train's
    controller polls (without it every worker group logs "Failed to query Ray Train Controller actor
    state" every few seconds) and the job server.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=True,
                 dashboard_host=LOOPBACK, dashboard_port=_free_port())
    return True


@contextmanager
def ray_session(address: str | None, num_cpus: int, runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """connect_or_start_ray for the duration of a block; shuts down only a Ray that it started."""
    owns_ray = connect_or_start_ray(address, num_cpus, runtime_env)
    try:
        yield
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


_NO_ROUTE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


class HeadWatch:
    """Ray's head answering, watched from a daemon thread: when the cluster's GCS (its gcs_server, on the head
    node) accepts no connection for `timeout_s` (dist.ray_head_timeout_s), `on_lost(reason)` is called once.

    Ray itself notices a lost GCS only after 60 s (RAY_gcs_rpc_server_reconnect_timeout_s), and until then
    its workers train on blind while the driver waits; a GCS that restarts within the timeout (GCS fault
    tolerance) is not a loss. The probe is a TCP connect to the GCS port every `poll_s`: a killed gcs_server
    refuses at once, a lost node times out.
    """

    def __init__(self, timeout_s: float, on_lost: Callable[[str], None] | None = None,
                 address: str | None = None, poll_s: float = 1.0):
        self.timeout_s, self.on_lost, self.poll_s = timeout_s, on_lost, poll_s
        self.address = address
        self.lost: str | None = None  # the reason, once lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HeadWatch:
        """Watch the GCS of the Ray this process is connected to (no-op outside Ray or with timeout 0)."""
        if self.timeout_s <= 0:
            return self
        if self.address is None:
            ray = sys.modules.get("ray")  # a local rank never imports Ray: nothing to watch
            if ray is None or not ray.is_initialized():
                return self
            self.address = ray.get_runtime_context().gcs_address
        self._thread = threading.Thread(target=self._watch, name="rtrain-ray-head-watch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> HeadWatch:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def answers(self) -> bool | None:
        """True: the GCS port accepted a connection; False: refused, timed out or unreachable; None: this
        process could not tell (out of descriptors or ports, a bad address): not evidence either way."""
        host, _, port = str(self.address).rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(min(self.poll_s, 5.0), 0.1)):
                return True
        except (ConnectionError, TimeoutError, socket.gaierror):  # refused, reset, timed out, name gone
            return False
        except OSError as error:
            return False if error.errno in _NO_ROUTE else None
        except ValueError:
            return None

    def _watch(self) -> None:
        """Lost after `timeout_s` of definite no-answers, counted only once the GCS answered at least once (an
        address this process cannot reach at all, e.g. behind ray://, is not watched)."""
        missing_since: float | None = None
        armed = False
        while not self._stop.wait(self.poll_s):
            answer = self.answers()
            if answer:
                armed, missing_since = True, None
            elif answer is False and armed:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since < self.timeout_s or self._stop.is_set():
                    continue
                self.lost = (f"lost the Ray head: its GCS at {self.address} did not answer for {self.timeout_s:g} s "
                             "(dist.ray_head_timeout_s; the head node or its gcs_server is gone)")
                if not self._stop.is_set() and self.on_lost is not None:
                    self.on_lost(self.lost)
                return
