"""One prepared GPU check: every CUDA figure rtrain owes, in one command of <= 8 minutes on one GPU.

    python benchmarks/gpu_check.py --out DIR [--dry-run]

Writes DIR/gpu_check.md and DIR/gpu_check.json: the git commit, torch / CUDA versions, the device, and per
section its figures or its error line. Sections (benchmarks/gpu_check_parts.py), each in its own process under
its own time budget, so a failure or hang in one is recorded and the rest still run:

  cuda_tests     pytest on the test files that skip without CUDA; pass/fail counts
  recipes        every recipe in recipes/ for 2 steps on the GPU (local launcher, tracking off, small shards
                 written here without Ray), plus one torch.compile run and one fp16 + loss scaling + fused SGD run
  throughput     ResNet-50 / ResNet-152 training img/s per GPU, batch 128, bf16 channels_last (next to a
                 reference field for NVIDIA's published figure, to be filled by hand)
  throughput_compiled  the same for ResNet-152 under torch.compile
  step_overhead  rtrain's train step / a bare PyTorch loop, ResNet-50 bf16 channels_last (goal <= 1.03)
  lars           LARS step / fused SGD step on ResNet-50 (goal <= 1.5)
  checkpoint     ResNet-152: sync save / plain write of the same bytes; async blocking / sync blocking
  loader         rtrain's loader img/s at 8 and 15 workers vs the GPU's ResNet-50 rate; data-wait fraction

`--dry-run`: the same code paths on the CPU at tiny sizes (well under a minute); CUDA-only parts are recorded
as "skipped (no CUDA)". Ratios are against baselines measured in the same run; nothing here asserts a time.

On the lent GPU machine (Python 3.12, torch, torchvision, timm, pytest; no network, no pydantic, webdataset or
simplejpeg), carry these wheels in .whl/ (about 3.3 MB; .whl/ is git-ignored), fetched here with
`pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl PKG` for PKG in pydantic==2.14.3
pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0, then run (timeout about 560 s, carry .whl):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export
    PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = Path(__file__).resolve().with_name("gpu_check_parts.py")
# section -> seconds on the GPU machine (sum 460 s: 20 s margin under 8 minutes for start-up and the report)
BUDGETS = {"cuda_tests": 90, "recipes": 115, "throughput": 45, "throughput_compiled": 75, "step_overhead": 30,
           "lars": 25, "checkpoint": 35, "loader": 45}
DRY_BUDGET = 40


def git_commit(repo: Path = REPO) -> str:
    """HEAD's commit: git if it runs, else read from .git (loose ref or packed-refs)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=False)
        if done.returncode == 0 and done.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            return done.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return commit_from_dot_git(repo / ".git")


def commit_from_dot_git(git: Path) -> str:
    try:
        if git.is_file():  # a worktree / submodule: "gitdir: PATH"
            git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, _common_dir(git)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
        return f"unknown ({ref} not found)"
    except OSError as exc:
        return f"unknown ({exc})"


def _common_dir(git: Path) -> Path:
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or 'unknown'})",
            "gpu_count": torch.cuda.device_count() if cuda else 0, "cpu_cores": os.cpu_count(),
            "host": platform.node(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def run_group(cmd: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group: past `timeout` the whole group (launcher workers too) dies."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_section(name: str, budget: float, dry: bool, scratch: Path, results: dict) -> dict:
    """One section in its own process; its JSON, or a record of how it failed."""
    out = scratch / f"{name}.json"
    context = scratch / f"{name}.context.json"
    context.write_text(json.dumps({"budget": budget, **{k: v for k, v in results.items() if k != "env"}},
                                  default=str))
    cmd = [sys.executable, str(PARTS), name, "--json", str(out), "--scratch", str(scratch / name),
           "--context", str(context)] + (["--dry-run"] if dry else [])
    started = time.perf_counter()
    try:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        done = run_group(cmd, budget, {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})
        log = done.stdout + done.stderr
        (scratch / f"{name}.log").write_text(log)
        if done.returncode == 0 and out.is_file():
            result = json.loads(out.read_text())
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["(no stderr)"]
            result = {"status": f"error: exit {done.returncode}: {lines[-1][:400]}"}
    except subprocess.TimeoutExpired:
        result = {"status": f"error: over its time budget of {budget:.0f} s"}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["budget_s"] = budget
    print(f"[gpu_check] {name:14s} {result['elapsed_s']:6.1f} s  {result.get('status')}", flush=True)
    return result


def _flat(prefix: str, value, rows: list[str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, rows)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        for item in value:
            label = item.get("recipe", "?")
            rows.append(f"| {prefix}.{label} | " + ", ".join(f"{k}={v}" for k, v in item.items()
                                                             if k != "recipe") + " |")
    else:
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        rows.append(f"| {prefix} | {text.replace('|', '/')} |")


def markdown(report: dict) -> str:
    lines = ["# rtrain GPU check", "", f"Mode: {report['mode']}; total {report['total_s']} s.", "",
             "## Environment", "", "| key | value |", "|---|---|"]
    _flat("", report["env"], rows := [])
    lines += rows
    for name in BUDGETS:
        section = report["sections"].get(name, {"status": "not run"})
        status = (f"Status: {section.get('status')} "
                  f"({section.get('elapsed_s', '?')} s of {section.get('budget_s', '?')} s)")
        lines += ["", f"## {name}", "", status, "", "| figure | value |", "|---|---|"]
        _flat("", {k: v for k, v in section.items() if k not in ("status", "elapsed_s", "budget_s")},
              rows := [])
        lines += rows
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md and gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only parts skipped")
    ap.add_argument("--only", default="", help="comma list of sections (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"mode": "dry-run (CPU)" if args.dry_run else "gpu", "env": environment(), "sections": {}}
    wanted = [s for s in BUDGETS if not args.only or s in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="rtrain-gpu-check-") as tmp:
        for name in wanted:
            budget = DRY_BUDGET if args.dry_run else BUDGETS[name]
            report["sections"][name] = run_section(name, budget, args.dry_run, Path(tmp), report["sections"])
    report["total_s"] = round(time.perf_counter() - started, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"[gpu_check] total {report['total_s']} s -> {args.out}/gpu_check.md, gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
