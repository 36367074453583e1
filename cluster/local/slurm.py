"""A real SLURM cluster on this host, for trying `cluster/slurm/*.sbatch` and for the tests: slurmctld and
two slurmd "nodes" (n1, n2, both 127.0.0.1 on their own ports), started in the foreground by PID.

    python -m cluster.local.slurm start --dir /tmp/rtrain-slurm     # prints `export SLURM_CONF=...`
    SLURM_CONF=/tmp/rtrain-slurm/slurm.conf sbatch -N 2 --gpus-per-node=0 cluster/slurm/rtrain.sbatch \
        recipes/quickstart.yaml   # the nodes have no GPUs: =0 replaces the scripts' default of 8
    python -m cluster.local.slurm stop --dir /tmp/rtrain-slurm

Needs root, the Debian packages `slurmctld slurmd slurm-client munge` (SLURM 22.05) and munged running
(started here as user munge when it is not). What makes it work on one host:
- ProctrackType=proctrack/cgroup (cgroup v1): SLURM finds every process of a job, including the ones that
  call setsid as Ray's daemons do, so cancelling a job leaves nothing behind (proctrack/linuxproc loses them);
- TaskPlugin=task/none, no accounting; several slurmd on one host (NodeName=n1/n2 with their own Port=,
  each started as `slurmd -N NAME`);
- a state directory of its own, so a fresh cluster starts at job 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.procs import (
    ServiceError,
    pid_alive,
    port_open,
    private_dir,
    read_pid,
    spawn_detached,
    stop_by_pid_file,
)
from rtrain._ports import unused_port

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
MUNGE_SOCKET_DIR = Path("/run/munge")
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LocalSlurm:
    root: Path
    conf: Path
    daemons: dict[str, Path] = field(default_factory=dict)  # name -> PID file

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with SLURM's client commands pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _free_port() -> int:
    return unused_port("127.0.0.1")


def missing_commands() -> list[str]:
    return [c for c in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged") if not shutil.which(c)]


def slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                      f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN" for name, port in node_ports.items())
    return f"""ClusterName=rtrain-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=10
{nodes}
PartitionName=debug Nodes={",".join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


def ensure_munged() -> None:
    """munged must run as user munge with its socket in /run/munge (the packaged key in /etc/munge)."""
    probe = subprocess.run(["munge", "-n"], capture_output=True)
    if probe.returncode == 0:
        return
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
    started = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    if started.returncode != 0:
        raise ServiceError(f"munged did not start: {started.stderr.strip()}")


def _wait_idle(slurm: LocalSlurm, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    states = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=slurm.env)
        states = done.stdout.strip()
        if done.returncode == 0 and all(f"{n} idle" in states for n in NODES):
            return
        for name, pid_file in slurm.daemons.items():
            pid = read_pid(pid_file)
            if pid is None or not pid_alive(pid):
                raise ServiceError(f"{name} exited during start-up; see {slurm.root / 'log'}")
        time.sleep(0.5)
    raise ServiceError(f"SLURM nodes not idle after {timeout_s:.0f} s (sinfo: {states!r}); see {slurm.root / 'log'}")


def start_slurm(root: str | Path, timeout_s: float = START_TIMEOUT_S) -> LocalSlurm:
    root = private_dir(root)  # this user's only: configuration, state, PID files
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ctld_port = _free_port()
    node_ports = {name: _free_port() for name in NODES}
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, ctld_port, node_ports))
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\n")
    ensure_munged()
    daemons = {"slurmctld": root / "run" / "slurmctld.pid"}
    spawn_detached(["slurmctld", "-D", "-i", "-f", str(conf)], root / "log" / "slurmctld.out",
                   daemons["slurmctld"])
    deadline = time.monotonic() + timeout_s
    while not port_open("127.0.0.1", ctld_port):
        if time.monotonic() > deadline:
            raise ServiceError(f"slurmctld not listening on {ctld_port}; see {root / 'log'}")
        time.sleep(0.2)
    for name in NODES:
        daemons[f"slurmd-{name}"] = root / "run" / f"slurmd-{name}.pid"
        spawn_detached(["slurmd", "-D", "-N", name, "-f", str(conf)], root / "log" / f"slurmd-{name}.out",
                       daemons[f"slurmd-{name}"])
    slurm = LocalSlurm(root=root, conf=conf, daemons=daemons)
    try:
        _wait_idle(slurm, timeout_s)
    except ServiceError:
        stop_slurm(slurm)
        raise
    return slurm


def stop_slurm(slurm: LocalSlurm) -> None:
    """Cancel what is still queued or running, then stop the daemons by PID (nodes first)."""
    subprocess.run(["scancel", "--full", "--quiet", "--partition", "debug"], env=slurm.env, capture_output=True)
    for name in sorted(slurm.daemons, key=lambda n: n == "slurmctld"):
        stop_by_pid_file(slurm.daemons[name], expect_in_cmdline="slurm", grace_s=30.0)


def _from_dir(root: Path) -> LocalSlurm:
    daemons = {"slurmctld": root / "run" / "slurmctld.pid",
               **{f"slurmd-{n}": root / "run" / f"slurmd-{n}.pid" for n in NODES}}
    return LocalSlurm(root=root, conf=root / "slurm.conf", daemons=daemons)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop"))
    parser.add_argument("--dir", default="/tmp/rtrain-slurm", help="configuration, state, logs, PID files")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    try:
        if args.command == "start":
            if missing := missing_commands():
                raise ServiceError(f"not installed: {', '.join(missing)} (apt-get install --no-install-recommends "
                                   "slurmctld slurmd slurm-client munge)")
            slurm = start_slurm(root)
            print(f"SLURM up: nodes {', '.join(NODES)}; logs in {root / 'log'}\nexport SLURM_CONF={slurm.conf}")
        else:
            stop_slurm(_from_dir(root))
            print(f"SLURM in {root} stopped")
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
