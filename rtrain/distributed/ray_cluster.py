"""Connect to a Ray cluster, or start a private local one, for the launcher and for data_prep.

Ray is imported only when called: importing this module stays cheap.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

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
