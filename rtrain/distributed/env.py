"""Where this process sits in the job: rank, world size, local rank, master address.

One function reads it from whichever launcher started us, in this order:
1. torch.distributed already initialized (Ray Train sets up the process group before calling the worker),
2. torchrun / plain env (RANK, WORLD_SIZE, LOCAL_RANK, ..., MASTER_ADDR, MASTER_PORT; rtrain's local launcher),
3. SLURM (SLURM_PROCID, SLURM_NTASKS, ...; the master is the first host of SLURM_JOB_NODELIST),
4. otherwise a single process.
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rtrain._errors import ExpectedError

LOOPBACK = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# SLURM has no master port: derive one from the job id so concurrent jobs sharing a node do not collide.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000
DEFAULT_TIMEOUT_S = 1800.0


class DistEnvError(ExpectedError, RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torch" | "ray" | "env" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None or text == "":
        if default is None:
            raise DistEnvError(f"environment variable {name} is missing")
        return default
    try:
        return int(text)
    except ValueError:
        raise DistEnvError(f"environment variable {name}={text!r} is not an integer") from None


def _check_ranks(env: DistEnv) -> DistEnv:
    if env.world_size < 1:
        raise DistEnvError(f"{env.source}: world size {env.world_size} < 1")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"{env.source}: rank {env.rank} outside [0, {env.world_size})")
    if not 0 <= env.local_rank < env.local_world_size:
        raise DistEnvError(f"{env.source}: local rank {env.local_rank} outside [0, {env.local_world_size})")
    return env


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"SLURM nodelist {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise DistEnvError(f"SLURM nodelist {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range_list(spec: str, nodelist: str) -> list[str]:
    """"1-3,05" -> ["1", "2", "3", "05"]; zero padding of the lower bound is kept, as SLURM does."""
    values = []
    for item in spec.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise DistEnvError(f"SLURM nodelist {nodelist!r}: bad range {item!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise DistEnvError(f"SLURM nodelist {nodelist!r}: descending range {item!r}")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a compressed SLURM hostlist ("n[1-3,5],gpu[01-02]-ib") without calling scontrol."""
    hosts = []
    for pattern in _split_top_level(nodelist):
        pieces = re.split(r"(\[[^\]]*\])", pattern)
        choices = [
            _expand_range_list(piece[1:-1], nodelist) if piece.startswith("[") else [piece]
            for piece in pieces if piece
        ]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise DistEnvError(f"SLURM nodelist {nodelist!r} names no host")
    return hosts


def _first_count(tasks_per_node: str) -> int:
    """SLURM_TASKS_PER_NODE looks like "4(x2),3": the first node's count is what this layout needs."""
    match = re.match(r"\s*(\d+)", tasks_per_node)
    if not match:
        raise DistEnvError(f"environment variable SLURM_TASKS_PER_NODE={tasks_per_node!r} is not understood")
    return int(match.group(1))


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int_var(environ, "SLURM_NTASKS", 1)
    if "SLURM_NTASKS_PER_NODE" in environ:
        local_world = _int_var(environ, "SLURM_NTASKS_PER_NODE")
    elif "SLURM_TASKS_PER_NODE" in environ:
        local_world = _first_count(environ["SLURM_TASKS_PER_NODE"])
    else:
        local_world = world_size
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    else:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        master_addr = expand_nodelist(nodelist)[0] if nodelist else LOOPBACK
    job_id = _int_var(environ, "SLURM_JOB_ID", 0)
    default_port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    return DistEnv(
        rank=_int_var(environ, "SLURM_PROCID"),
        world_size=world_size,
        local_rank=_int_var(environ, "SLURM_LOCALID", 0),
        local_world_size=local_world,
        node_rank=_int_var(environ, "SLURM_NODEID", 0),
        master_addr=master_addr,
        master_port=_int_var(environ, "MASTER_PORT", default_port),
        source="slurm",
    )


def _from_plain_env(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int_var(environ, "WORLD_SIZE")
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE", world_size)
    if world_size > 1 and "MASTER_ADDR" not in environ:
        raise DistEnvError(f"RANK/WORLD_SIZE={world_size} are set but MASTER_ADDR is missing")
    return DistEnv(
        rank=_int_var(environ, "RANK"),
        world_size=world_size,
        local_rank=_int_var(environ, "LOCAL_RANK", 0),
        local_world_size=local_world,
        node_rank=_int_var(environ, "GROUP_RANK", _int_var(environ, "NODE_RANK", 0)),
        master_addr=environ.get("MASTER_ADDR", LOOPBACK),
        master_port=_int_var(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
        source="env",
    )


def _ray_train_context():
    """Ray Train's context when this process is a Ray Train worker, else None (without importing Ray)."""
    if "ray.train" not in sys.modules:
        return None
    try:
        return sys.modules["ray.train"].get_context()
    except Exception:  # outside a Ray Train worker get_context raises; the type varies across Ray versions
        return None


def _from_initialized_group(environ: Mapping[str, str]) -> DistEnv:
    context = _ray_train_context()
    if context is not None:
        local_rank, local_world = context.get_local_rank(), context.get_local_world_size()
        node_rank, source = context.get_node_rank(), "ray"
    else:
        local_rank = _int_var(environ, "LOCAL_RANK", 0)
        local_world = _int_var(environ, "LOCAL_WORLD_SIZE", dist.get_world_size())
        node_rank, source = _int_var(environ, "NODE_RANK", 0), "torch"
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=environ.get("MASTER_ADDR", LOOPBACK),
        master_port=_int_var(environ, "MASTER_PORT", DEFAULT_MASTER_PORT),
        source=source,
    )


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read this process's place in the job; `environ` defaults to os.environ (tests pass a dict)."""
    environ = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():
        env = _from_initialized_group(environ)
    elif "RANK" in environ or "WORLD_SIZE" in environ:
        env = _from_plain_env(environ)
    elif "SLURM_PROCID" in environ:
        env = _from_slurm(environ)
    else:
        env = DistEnv(0, 1, 0, 1, 0, LOOPBACK, DEFAULT_MASTER_PORT, "single")
    return _check_ranks(env)


def init_distributed(env: DistEnv, use_gpu: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on GPU) unless already joined; return this rank's device."""
    if use_gpu:
        if not torch.cuda.is_available():
            raise DistEnvError("dist.use_gpu=true but CUDA is not available on this host")
        if env.local_rank >= torch.cuda.device_count():
            raise DistEnvError(
                f"local rank {env.local_rank} has no GPU: this host has {torch.cuda.device_count()}")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        # env:// reads the rendezvous point from these; rank and world size are passed explicitly.
        os.environ["MASTER_ADDR"] = env.master_addr
        os.environ["MASTER_PORT"] = str(env.master_port)
        dist.init_process_group(
            backend="nccl" if use_gpu else "gloo",
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if dist.is_initialized() and dist.get_world_size() != env.world_size:
        raise DistEnvError(
            f"process group has {dist.get_world_size()} ranks but the environment says {env.world_size}")
    return device


def shutdown_distributed() -> None:
    """Leave the process group if joined; at exit a peer may already be gone, so errors are not fatal."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # a dead peer or a torn-down store must not mask the run's own outcome
        print(f"rtrain: ignoring error while destroying the process group: {exc}", file=sys.stderr)
