"""benchmarks/gpu_check.py --dry-run: every section runs on the CPU at tiny sizes and lands in both reports.

No timings are asserted (house rule): only that the reports exist, name every section, and the JSON holds the
expected keys; CUDA-only parts say "skipped (no CUDA)" when there is no GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("cuda_tests", "recipes", "throughput", "throughput_compiled", "step_overhead", "lars", "checkpoint",
            "loader")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_reports_exist_and_name_every_section(dry_run):
    out, stdout = dry_run
    md = (out / "gpu_check.md").read_text()
    for name in SECTIONS:
        assert f"## {name}" in md
        assert f"[gpu_check] {name}" in stdout  # elapsed per section is printed
    assert "## Environment" in md


def test_json_has_the_environment_and_every_section_ok_or_skipped(dry_run):
    out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert {"mode", "env", "sections", "total_s"} <= report.keys()
    assert {"commit", "torch", "cuda", "device", "python"} <= report["env"].keys()
    assert report["env"]["commit"] and not report["env"]["commit"].startswith("unknown")
    assert set(report["sections"]) == set(SECTIONS)
    for name, section in report["sections"].items():
        assert {"status", "elapsed_s", "budget_s"} <= section.keys(), name
        assert section["status"] == "ok" or section["status"].startswith("skipped"), (name, section["status"])
    s = report["sections"]
    assert {"ratio_vs_bare", "bare_ms", "rtrain_ms"} <= s["step_overhead"].keys()
    assert {"ratio_lars_vs_fused_sgd_step", "ratio_lars_vs_fused_sgd_optimizer_only"} <= s["lars"].keys()
    assert {"ratio_sync_save_vs_plain_write", "ratio_async_vs_sync_blocking"} <= s["checkpoint"].keys()
    assert {"per_gpu", "reference"} <= s["throughput"].keys()
    assert {"loader_img_per_s", "data_wait_fraction"} <= s["loader"].keys()
    assert all(run["status"] == "ok" for run in s["recipes"]["runs"])
    if not torch.cuda.is_available():
        assert s["cuda_tests"]["status"] == "skipped (no CUDA)"
        assert s["throughput_compiled"]["per_gpu"]["resnet152 compiled"]["status"] == "skipped (no CUDA)"


def test_commit_is_read_from_dot_git_without_git(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check import commit_from_dot_git
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert commit_from_dot_git(git) == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert commit_from_dot_git(git) == "b" * 40
    (git / "HEAD").write_text("c" * 40 + "\n")
    assert commit_from_dot_git(git) == "c" * 40
