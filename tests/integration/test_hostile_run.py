"""A training run over a stranger's shards, for real: the 2-rank quickstart (local launcher, a loader worker
process per rank) reading the digits shards over HTTP from a server on 127.0.0.1, where one shard stalls
(its body trickles a byte at a time: every read returns, the shard never ends), one has a tar header that
lies about its member's size, and one holds a JPEG bomb (a 700-byte file whose header claims 60000 x 60000).

Attempts 1 and 2 end in exit 76 (retryable) naming the stalled shard and record it; attempt 3 (what a
requeue runs) leaves it out (quarantine: log line, MLflow tag), skips the lying header's rest and the bomb
naming both, and finishes. The peak RSS of every process of every attempt is measured and bounded: decoding
the bomb alone would take ~10 GB."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray_runs import REPO, descendants, launch_command, mlflow_runs, quickstart_overrides, run_env
from testkit import http_folder

from rtrain._process import EXIT_STALLED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STALLS, LIES, BOMB = "train-000005.tar", "train-000006.tar", "train-000007.tar"
MAX_RSS = 3 << 30


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buffer, "JPEG", progressive=True)
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc2")
    data[at + 5:at + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    return bytes(data)


def _lie_about_a_size(path: Path, member: int) -> str:
    """Member `member`'s header claims 8 GiB (checksum kept valid): the shard is damaged from there on."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    data = bytearray(path.read_bytes())
    header = data[info.offset:info.offset + 512]
    header[124:136] = b"77777777777\0"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    data[info.offset:info.offset + 512] = header
    path.write_bytes(bytes(data))
    return info.name


def _plant_a_bomb(path: Path, sample: int) -> str:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == jpgs[sample]:
                data = _bomb()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return jpgs[sample].rsplit(".", 1)[0]


def _hostile_copy(shards: Path, root: Path) -> tuple[str, str]:
    shutil.copytree(shards, root)
    lying = _lie_about_a_size(root / "train" / LIES, 41)
    bomb_key = _plant_a_bomb(root / "train" / BOMB, 7)
    manifest_path = root / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        data = (root / "train" / entry["name"]).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    return lying, bomb_key


class _PeakRss:
    """Samples VmHWM (peak resident set) of every process below `root` until stopped."""

    def __init__(self, root: int):
        self.root, self.peaks, self._stop = root, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in [self.root, *descendants(self.root)]:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace")
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        kib = int(line.split()[1])
                        self.peaks[(pid, name)] = max(self.peaks.get((pid, name), 0), kib << 10)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


def _attempt(cmd: list[str]) -> tuple[int, str, dict]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=run_env())
    rss = _PeakRss(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        peaks = rss.stop()
    return proc.returncode, stderr, peaks


def test_stalled_lying_and_bomb_shards_quarantine_skip_and_finish_in_bounded_memory(digits_shards, tmp_path):
    lying, bomb_key = _hostile_copy(digits_shards, tmp_path / "data")
    with http_folder(tmp_path / "data", stalls=STALLS, head=4096) as url:
        cmd = launch_command(quickstart_overrides(Path("/unused"), tmp_path, "hostile", 14, "dist.launcher=local",
                                                  "data.on_bad_sample=skip", "data.loader_timeout_s=4"))
        cmd = [item if not item.startswith("data.source=") else f"data.source={url}" for item in cmd]
        peaks: dict = {}
        for attempt in (1, 2):
            code, stderr, seen = _attempt(cmd)
            peaks.update(seen)
            assert code == EXIT_STALLED, stderr[-4000:]
            last = stderr.strip().splitlines()[-1]
            assert "no batch from its 1 loader worker process(es) in 4 s (data.loader_timeout_s)" in last, last
            assert f"on shard {STALLS}" in last and "Traceback" not in stderr, last
        code, stderr, seen = _attempt(cmd)
        peaks.update(seen)
    assert code == 0, stderr[-4000:]
    assert f"quarantined for this run (stalled or killed a rank in two attempts; see suspects.jsonl in the run " \
           f"directory): shard {STALLS}" in stderr
    assert f"shard {url}/train/{LIES}: " in stderr and "skipping the rest of it" in stderr
    assert f"sample '{bomb_key}'" in stderr and "60000 x 60000" in stderr, stderr[-4000:]
    assert "rtrain: finished 'hostile'" in stderr
    records = [json.loads(line) for line in (tmp_path / "hostile" / "suspects.jsonl").read_text().splitlines()]
    assert {(r["shard"], r["sample"]) for r in records} == {(STALLS, None)} and len(records) == 2
    # Attempts that stopped before their first checkpoint leave FAILED runs; the one that finished says why.
    [run] = [r for r in mlflow_runs(tmp_path, "hostile") if r.info.status == "FINISHED"]
    assert run.data.tags["rtrain.quarantined"] == f"shard {STALLS}"
    assert len(peaks) >= 9, peaks  # three attempts: launcher, two ranks, their loader workers
    worst = max(peaks.items(), key=lambda item: item[1])
    assert worst[1] < MAX_RSS, f"peak RSS {worst[1] >> 20} MiB in pid {worst[0][0]} ({worst[0][1]})"
    print(f"peak RSS per process, MiB: {sorted(v >> 20 for v in peaks.values())}")
