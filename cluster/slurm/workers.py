"""How many workers a SLURM allocation holds, for `cluster/slurm/*.sbatch`: one per GPU (nodes x GPUs per node,
with dist.use_gpu=true), or one per node where the job has no GPUs (a CPU allocation, as in the local test
cluster).

    python -m cluster.slurm.workers [key=value ...]   # the recipe overrides given to the sbatch script

prints the overrides the script adds, space-separated: `dist.num_workers=N` unless dist.num_workers was given,
and `dist.use_gpu=true` on a GPU allocation unless dist.use_gpu was given; a line on stderr says where N came
from. The recipe's own dist.num_workers is replaced by what the allocation holds, on purpose: the batch per
worker is then train.global_batch / N, and where that does not divide the launch stops with the recipe error on
train.global_batch (the batch is never changed here). Exit status 2 on a malformed variable.

Where the numbers come from (the first that is set):
- nodes: SLURM_JOB_NUM_NODES, SLURM_NNODES, else 1;
- GPUs per node: SLURM_GPUS_PER_NODE (`--gpus-per-node`: "8", "a100:8", "gpu:a100:8", "a100:4,v100:4"),
  SLURM_GPUS_ON_NODE (set on the batch node with `--gres=gpu:N` too), else 0;
- workers per node: RTRAIN_WORKERS_PER_NODE, else the GPUs per node, else 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

WORKERS_PER_NODE_ENV = "RTRAIN_WORKERS_PER_NODE"


class AllocationError(ValueError):
    """A SLURM (or RTRAIN_) variable this module reads is not in a form it knows; the message names it."""


def _count(name: str, text: str) -> int:
    if not text.strip().isdigit():
        raise AllocationError(f"{name}={text!r}: expected a count of GPUs, optionally typed (8, a100:8, gpu:a100:8)")
    return int(text)


def parse_gpus(text: str | None, name: str = "SLURM_GPUS_PER_NODE") -> int:
    """GPUs in a SLURM GPU count: "8", "a100:8", "gpu:a100:8", "a100:4,v100:4" (summed); "", "0", None -> 0.

    The count is the last `:` field of each comma-separated item (the ones before it name the GRES and type).
    A trailing "(S:0-1)"-style socket note, as some SLURM versions print in GRES strings, is ignored."""
    if text is None or not text.strip():
        return 0
    total = 0
    for item in text.split(","):
        item = item.split("(", 1)[0].strip()
        if not item:
            continue
        total += _count(name, item.rsplit(":", 1)[-1])
    return total


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs SLURM gave this job on each node (0 on a CPU allocation)."""
    for name in ("SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        if env.get(name, "").strip():
            return parse_gpus(env[name], name)
    return 0


def node_count(env: Mapping[str, str]) -> int:
    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(name, "").strip():
            nodes = _count(name, env[name])
            if nodes < 1:
                raise AllocationError(f"{name}={env[name]!r}: expected at least one node")
            return nodes
    return 1


def allocation_workers(env: Mapping[str, str]) -> tuple[int, bool]:
    """(num_workers, use_gpu) for the allocation `env` describes: nodes x GPUs per node and True on a GPU
    allocation, nodes x 1 and False on a CPU one; RTRAIN_WORKERS_PER_NODE replaces the per-node count."""
    nodes, gpus = node_count(env), gpus_per_node(env)
    per_node = gpus or 1
    if env.get(WORKERS_PER_NODE_ENV, "").strip():
        per_node = _count(WORKERS_PER_NODE_ENV, env[WORKERS_PER_NODE_ENV])
        if per_node < 1:
            raise AllocationError(f"{WORKERS_PER_NODE_ENV}={env[WORKERS_PER_NODE_ENV]!r}: expected at least 1")
    return nodes * per_node, gpus > 0


def extra_overrides(overrides: list[str], env: Mapping[str, str]) -> list[str]:
    """The overrides the sbatch scripts add to the user's: the allocation's worker count and, with GPUs,
    dist.use_gpu=true; a key the user gave is left as given."""
    given = {item.partition("=")[0].strip() for item in overrides}
    workers, use_gpu = allocation_workers(env)
    extra = [] if "dist.num_workers" in given else [f"dist.num_workers={workers}"]
    if use_gpu and "dist.use_gpu" not in given:
        extra.append("dist.use_gpu=true")
    return extra


def describe(env: Mapping[str, str]) -> str:
    nodes, gpus = node_count(env), gpus_per_node(env)
    workers, _ = allocation_workers(env)
    per_node = workers // nodes
    why = (f"{WORKERS_PER_NODE_ENV}={per_node}" if env.get(WORKERS_PER_NODE_ENV, "").strip()
           else f"{gpus} GPU(s)" if gpus else "no GPUs: one CPU worker")
    return f"{nodes} node(s) x {per_node} worker(s) per node ({why}) = {workers} worker(s)"


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    if overrides[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        extra = extra_overrides(overrides, os.environ)
        print(f"rtrain: the allocation: {describe(os.environ)}", file=sys.stderr)
    except AllocationError as exc:
        print(f"rtrain: {exc}", file=sys.stderr)
        return 2
    print(" ".join(extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
