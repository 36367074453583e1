"""A shard truncated on disk under a real 2-rank quickstart launch (`python -m rtrain.launch`, local launcher):
under skip the run finishes, the log names the shard and where it fails, and the summary counts the skipped
samples per shard over both ranks; under raise the launcher's last line is the one-line error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 11  # 1437 digits / global batch 128

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def cut_shards(digits_shards, tmp_path_factory) -> tuple[Path, str, int, int]:
    """A copy of the digits shards with train shard 1 cut at half its bytes: (root, name, prefix, count)."""
    root = tmp_path_factory.mktemp("cut") / "shards"
    shutil.copytree(digits_shards, root)
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    entry = manifest["shards"][1]
    path = root / "train" / entry["name"]
    data = path.read_bytes()
    cut = len(data) // 2
    ends: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + member.size)
    prefix = sum(1 for end in ends.values() if end <= cut)  # members are in sample order
    path.write_bytes(data[:cut])
    return root, entry["name"], prefix, entry["count"]


def _launch(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rtrain.launch", "recipes/quickstart.yaml", f"data.source={shards}",
           f"run.output_root={out}", "run.name=r", "dist.launcher=local", f"train.max_steps={STEPS_PER_EPOCH}",
           "tracking.enabled=false", "eval.every_epochs=100", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_truncated_shard_is_named_and_counted_per_shard(cut_shards, tmp_path):
    shards, name, prefix, count = cut_shards
    proc = _launch(shards, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["skipped_by_shard"]) == {name}
    # one epoch drops its last partial global batch (29 samples), so at most the whole unreadable tail
    assert 0 < summary["skipped_by_shard"][name] <= count - prefix
    assert summary["skipped_samples"] == summary["skipped_by_shard"][name]
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line and name in line]
    assert warnings and all(f"{name}: damaged from sample {prefix} of {count}" in line for line in warnings)
    assert "python -m data_prep.verify" in warnings[0]


def test_truncated_shard_under_raise_ends_with_one_line(cut_shards, tmp_path):
    shards, name, prefix, count = cut_shards
    proc = _launch(shards, tmp_path / "out", "data.on_bad_sample=raise")
    assert proc.returncode == 1, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rtrain: rank ") and " failed: ShardError: shard " in last, proc.stderr[-3000:]
    assert f"{name}: damaged from sample {prefix} of {count}" in last
    assert last.endswith(f"check the shards with: python -m data_prep.verify {shards / 'train'}")
    assert "Caught" not in last
