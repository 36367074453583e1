"""What hostile input costs, before and after the defences (issue: never hang, never crash-loop, never leak).

1. bomb: peak RSS of a fresh process that puts one image bomb (a ~700-byte progressive JPEG whose header claims
   WIDTH x HEIGHT) through the loader's decode path (rtrain.data.decode: probe, then render into a batch slot),
   with the pixel budget (data.max_image_pixels, default) and without it (budget raised to 10^12: what every
   path did before). Also a normal ImageNet-sized JPEG as the floor. Each in its own process, ru_maxrss.
2. stall: the 2-rank quickstart (digits shards built with data_prep) with dist.stall_timeout_s=T; once its first
   checkpoint exists, one rank is SIGSTOPped; seconds from the stop to the launcher's exit (76) on the local and
   the Ray launcher. Without the watchdog the run waited for torch's collective timeout (1800 s); that baseline
   is not run here (30 minutes per launcher).

    python benchmarks/hostile_input.py [--side 16000] [--stall-timeout 6] [--skip-stall]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_DECODE_ONE = """
import io, json, resource, sys
import numpy as np, torch
from rtrain.data.decode import DecodeError, PixelBuffer, probe, render
from rtrain.data.transforms import make_view
from rtrain.config import DataConfig
data = sys.stdin.buffer.read()
cfg = DataConfig(source="/unused", image_size=224, max_image_pixels=int(sys.argv[1]))
out = torch.empty((3, 224, 224), dtype=torch.uint8)
began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = "decoded"
try:
    source = probe(data, cfg.max_image_pixels)
    view = make_view(cfg, True, 0, 0, "k", source.width, source.height)
    render(source, view, PixelBuffer(), out)
except DecodeError as exc:
    outcome = "refused: " + str(exc)[:80]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": began, "peak_kib": peak, "outcome": outcome}))
"""


def _jpeg(side: int, claim: tuple[int, int] | None = None) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=claim is not None, quality=85)
    data = bytearray(buffer.getvalue())
    if claim is not None:
        at = data.find(b"\xff\xc2")
        data[at + 5:at + 9] = claim[1].to_bytes(2, "big") + claim[0].to_bytes(2, "big")
    return bytes(data)


def _decode_in_fresh_process(data: bytes, budget: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _DECODE_ONE, str(budget)], input=data, capture_output=True,
                          cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        return {"peak_kib": 0, "outcome": f"process exited {done.returncode}: {done.stderr.decode()[-200:]}"}
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def bomb(side: int) -> None:
    from rtrain.data.decode import DEFAULT_MAX_IMAGE_PIXELS

    normal = _jpeg(500)
    bomb_bytes = _jpeg(16, claim=(side, side))
    rows = [("normal 500x500 JPEG, default budget", normal, DEFAULT_MAX_IMAGE_PIXELS),
            (f"bomb ({len(bomb_bytes)} B claiming {side}x{side}), budget off", bomb_bytes, 10**12),
            (f"bomb ({len(bomb_bytes)} B claiming {side}x{side}), default budget", bomb_bytes,
             DEFAULT_MAX_IMAGE_PIXELS)]
    peaks = []
    print(f"{'case':58s} {'peak RSS MiB':>12s}  outcome")
    for name, data, budget in rows:
        result = _decode_in_fresh_process(data, budget)
        peaks.append(result["peak_kib"] / 1024)
        print(f"{name:58s} {peaks[-1]:12.0f}  {result['outcome']}")
    print(f"bomb peak RSS, budget off / default budget: {peaks[1] / peaks[2]:.1f}x "
          f"({peaks[1] - peaks[0]:.0f} MiB over a normal image's process vs {peaks[2] - peaks[0]:.0f} MiB)")


def _digits(root: Path) -> Path:
    for argv in (["data_prep.samples", "digits", "--out", str(root / "folders")],
                 ["data_prep.imagenet", "--src", str(root / "folders"), "--out", str(root / "shards"),
                  "--shard-size", "200", "--workers", "2", "--no-progress"]):
        subprocess.run([sys.executable, "-m", *argv], cwd=REPO, check=True, capture_output=True, timeout=900)
    return root / "shards"


def _rank_pids(launcher_pid: int, launcher: str) -> list[int]:
    rows = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    table = [line.split(None, 2) for line in rows.splitlines()]
    below, frontier = set(), [launcher_pid]
    while frontier:
        parent = frontier.pop()
        kids = [int(p) for p, pp, *_ in table if int(pp) == parent]
        below.update(kids)
        frontier += kids
    mark = "rank_process" if launcher == "local" else "ray::RayTrainWorker"
    found = {int(p): int(pp) for p, pp, *rest in table if int(p) in below and rest and mark in rest[0]}
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


def stall(shards: Path, out: Path, launcher: str, timeout_s: int) -> float:
    cmd = [sys.executable, "-m", "rtrain.launch", "recipes/quickstart.yaml", f"data.source={shards}",
           f"run.output_root={out}", f"run.name=stall-{launcher}", f"dist.launcher={launcher}",
           "dist.max_failures=0", f"dist.stall_timeout_s={timeout_s}", "train.max_steps=5000",
           "checkpoint.every_steps=3", "tracking.enabled=false", "eval.every_epochs=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    checkpoints = out / f"stall-{launcher}" / "checkpoints"
    try:
        while not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        os.kill(_rank_pids(proc.pid, launcher)[-1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = proc.communicate(timeout=timeout_s + 300)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{launcher:6s} launcher: exit {proc.returncode} {took:5.1f} s after the SIGSTOP "
          f"(dist.stall_timeout_s={timeout_s}); last line: {stderr.strip().splitlines()[-1][:110]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=16000)
    parser.add_argument("--stall-timeout", type=int, default=6)
    parser.add_argument("--skip-stall", action="store_true")
    args = parser.parse_args()
    bomb(args.side)
    if args.skip_stall:
        return
    with tempfile.TemporaryDirectory(prefix="rtrain-bench-hostile-") as tmp:
        shards = _digits(Path(tmp))
        for launcher in ("local", "ray"):
            stall(shards, Path(tmp) / "runs", launcher, args.stall_timeout)
    print("without the watchdog: torch's collective timeout, 1800 s (not run)")


if __name__ == "__main__":
    main()
