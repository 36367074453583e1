"""A data_prep run killed for real (SIGKILL) mid-way, rerun: the result is identical to a clean run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.synthetic import SyntheticSpec, write_synthetic
from rtrain.data.format import MANIFEST_NAME, Manifest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _shard_bytes(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("*/*.tar")) + sorted(out.glob(f"*/{MANIFEST_NAME}"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def _session_processes(session_id: int) -> list[int]:
    """Processes in the session we created for the killed run (its Ray head and workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # field 6 of /proc/PID/stat: session id
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(session_id: int) -> None:
    for pid in _session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _prep_command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep.imagenet", "--src", str(src), "--out", str(out),
            "--shard-size", "2", "--max-side", "64", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    write_synthetic(root, SyntheticSpec(classes=4, per_class=40, val_per_class=2, image_size=(500, 375)))
    return root


def test_run_killed_midway_resumes_to_identical_result(big_src, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_prep_command(big_src, killed_out), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list((killed_out / "train").glob("train-*.tar"))) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_session(proc.pid)
    assert not (killed_out / "train" / MANIFEST_NAME).exists()  # really killed mid-way
    done_before = len(list((killed_out / "train").glob("train-*.tar")))
    resumed = subprocess.run(_prep_command(big_src, killed_out), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reused = int(next(l for l in resumed.stdout.splitlines() if "reused" in l).split()[-1])
    assert reused >= done_before - 1  # a shard being renamed at kill time may be redone
    fresh = subprocess.run(_prep_command(big_src, clean_out), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert _shard_bytes(killed_out) == _shard_bytes(clean_out)
    assert Manifest.load(killed_out / "train" / MANIFEST_NAME).num_samples > 0
