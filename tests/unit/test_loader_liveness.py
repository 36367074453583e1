"""A loader worker process that is stuck (busy in a decode that never ends, here a spinning stand-in) neither
outlives its rank nor holds the rank forever: SIGKILL the rank and its workers are gone at once (they would
spin on as orphans); with data.loader_timeout_s the rank fails with one LoaderStall line naming it and its
shards. The rank is a real process iterating a real loader over real shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_loader_fixtures import write_split

HERE = Path(__file__).parent
# The rank: a loader with 2 worker processes whose slot reader spins forever, as a decode stuck in a loop would.
RANK = """
import sys
from test_loader_fixtures import small_cfg
from rtrain.data import LoaderStall, build_loader
from rtrain.data import worker

def spin(self):
    while True:
        pass
    yield

worker.SlotReader.batches = spin
cfg = small_cfg(sys.argv[1], num_workers=2, loader_timeout_s=float(sys.argv[2]))
loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=2, seed=0, train=True)
print("iterating", flush=True)
try:
    next(iter(loader))
except LoaderStall as exc:
    print(f"LoaderStall: {exc}", flush=True)
    sys.exit(3)
"""


def _children(pid: int) -> list[int]:
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in listed.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"


def _start_rank(root: Path, timeout_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RANK, str(root), str(timeout_s)], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_loader_workers_die_with_their_rank(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [6, 6])
    rank = _start_rank(tmp_path, 0)
    try:
        assert rank.stdout.readline().strip() == "iterating"
        deadline = time.monotonic() + 60
        while len(workers := _children(rank.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2, workers
        time.sleep(1)  # both spinning
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"loader workers {left} outlived their rank"
    finally:
        if rank.poll() is None:
            rank.kill()


def test_a_stuck_worker_is_a_loader_stall_within_the_timeout(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [6, 6])
    rank = _start_rank(tmp_path, 2)
    try:
        out, err = rank.communicate(timeout=120)
    finally:
        if rank.poll() is None:
            rank.kill()
    assert rank.returncode == 3, err[-3000:]
    line = out.strip().splitlines()[-1]
    assert line.startswith("LoaderStall: rank 0: no batch from its 2 loader worker process(es) in 2 s "
                           "(data.loader_timeout_s)"), line
    assert "train-000000.tar" in line
