"""The sections of benchmarks/gpu_check.py; each runs in its own process (a crash or hang stays in it):

    python benchmarks/gpu_check_parts.py SECTION --json FILE --scratch DIR [--dry-run] [--context FILE]

writes SECTION's figures as a JSON object to FILE. `--dry-run`: CPU, tiny sizes; CUDA-only parts are recorded
as "skipped (no CUDA)". Ratios are against baselines measured in the same process (house rule).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository first: benchmarks/data_prep.py would shadow data_prep
sys.path.insert(1, str(REPO / "tests"))

import torch  # noqa: E402  (after the path set-up above)
import torch.nn.functional as F  # noqa: E402

CUDA = torch.cuda.is_available()
SKIP = "skipped (no CUDA)"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _device(dry: bool) -> torch.device:
    return torch.device("cuda", 0) if CUDA and not dry else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(n: int, size: int, classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), y.to(device)


def _rtrain_step(model_name: str, device, optim: str = "sgd", fused=None, compile_: bool = False):
    """rtrain's full train step (bf16 autocast, channels_last) as a zero-argument callable over (x, y)."""
    from rtrain.config import PrecisionConfig
    from rtrain.distributed.backend import DDPBackend
    from rtrain.distributed.scaler import build_scaler
    from rtrain.engine.step import Normalizer, TrainStep
    from rtrain.models import build
    from rtrain.optim import build_optimizer

    torch.manual_seed(0)
    model = build(model_name).to(device, memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    opt = build_optimizer(model, optim, lr=0.05 if optim == "sgd" else 1.0, weight_decay=1e-4, fused=fused)
    precision = PrecisionConfig(dtype="bf16")
    backend = DDPBackend(model, opt, build_scaler(precision, device), device=device)
    return TrainStep(backend, Normalizer(MEAN, STD, device, True), precision), opt


def _seconds_per_step(step, device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


# ---- sections -------------------------------------------------------------------------------------------

def cuda_tests(dry: bool, scratch: Path, context: dict) -> dict:
    files = sorted(subprocess.run(["grep", "-rlE", "needs (a )?CUDA", "tests/"], cwd=REPO, capture_output=True,
                                  text=True, check=False).stdout.split())
    if not CUDA or dry:
        return {"status": SKIP, "files": files}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=REPO,
                              capture_output=True, text=True, timeout=context.get("budget", 150) - 10, check=False)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"status": f"error: pytest over {exc.timeout:.0f} s", "files": files, "output_tail": tail[-600:]}
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"status": "ok" if done.returncode == 0 else f"pytest exit {done.returncode}", "files": files,
            "summary": summary, "counts": counts, "failed": failed[:20]}


def make_shards(root: Path) -> Path:
    """Small train/val shards, written without Ray: the digits if scikit-learn is there, else synthetic."""
    from data_prep import imagenet
    from data_prep.parallel import run_shard_jobs_in_process

    src = root / "folders"
    try:
        from data_prep.samples import write_digits
        write_digits(src, val_fraction=0.015)
    except ImportError:  # no scikit-learn: data_prep.synthetic's drawn images, 10 classes, 32 px
        from data_prep.synthetic import SyntheticSpec, write_synthetic
        write_synthetic(src, SyntheticSpec(classes=10, per_class=40, val_per_class=3, image_size=(40, 40),
                                           quirks=False))
    args = imagenet.build_parser().parse_args(["--src", str(src), "--out", str(root / "shards"),
                                               "--shard-size", "400", "--no-progress"])
    imagenet.run(args, run_jobs=run_shard_jobs_in_process)
    return root / "shards"


def _cuda_overrides(recipe, shards: Path, out: Path, name: str) -> list[str]:
    """test_recipes_run's rules at one-GPU scale: precision, loss scaling, fused SGD, torch SyncBN,
    channels_last, activation checkpointing stay as shipped; only what is not installed is swapped."""
    import importlib.util

    from rtrain.models.registry import model_info

    o = [f"data.source={shards}", "data.num_workers=2", "data.shuffle_buffer=16", f"run.output_root={out}",
         f"run.name={name}", "dist.launcher=local", "dist.use_gpu=true", "dist.num_workers=1",
         "train.global_batch=16", "train.max_steps=2", "train.accumulation_steps=1", "eval.batch_size=16",
         "checkpoint.every_steps=1", "tracking.enabled=false"]
    if model_info(recipe.model.name).family == "imagenet":
        o += ["data.image_size=32", "data.eval_resize=36", "data.scale_min=36", "data.scale_max=48"]
    if recipe.eval.scales:
        o.append("eval.scales=[32,40]")
    if recipe.dist.syncbn == "apex" and importlib.util.find_spec("apex") is None:
        o.append("dist.syncbn=torch")
    if recipe.data.backend == "dali" and importlib.util.find_spec("nvidia.dali") is None:
        o.append("data.backend=webdataset")
    if recipe.optim.impl != "torch" and importlib.util.find_spec(recipe.optim.impl) is None:
        o.append("optim.impl=torch")
    return o


def _recipe_runs(dry: bool, shards: Path, out: Path) -> list[tuple[str, Path, list[str]]]:
    from rtrain.config import load_recipe

    paths = sorted((REPO / "recipes").rglob("*.yaml"))
    if dry:
        from integration.test_recipes_run import cpu_scale

        path = REPO / "recipes" / "quickstart.yaml"
        o = [x for x in cpu_scale(load_recipe(path), shards, out, "quickstart") if not x.startswith("tracking.")]
        return [("quickstart", path, o + ["tracking.enabled=false", "dist.num_workers=1", "train.global_batch=2"])]
    runs = []
    for path in paths:
        name = str(path.relative_to(REPO / "recipes")).removesuffix(".yaml").replace("/", "-")
        runs.append((name, path, _cuda_overrides(load_recipe(path), shards, out, name)))
    quick = REPO / "recipes" / "quickstart.yaml"
    paper = REPO / "recipes" / "r50_paper.yaml"
    runs.append(("quickstart+compile", quick,
                 _cuda_overrides(load_recipe(quick), shards, out, "qs-compile") + ["train.compile=true"]))
    runs.append(("r50_paper+fp16+fused", paper, _cuda_overrides(load_recipe(paper), shards, out, "r50-fp16") +
                 ["precision.dtype=fp16", "precision.scaler=dynamic", "optim.fused=true"]))
    return runs


def _launch(name: str, path: Path, overrides: list[str], timeout: float) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "2"}
    try:
        done = subprocess.run([sys.executable, "-m", "rtrain.launch", str(path), *overrides], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"recipe": name, "status": f"error: timeout after {timeout:.0f} s"}
    row = {"recipe": name, "seconds": round(time.perf_counter() - started, 1)}
    if done.returncode != 0:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
        return {**row, "status": f"error: exit {done.returncode}: {tail[0][:300]}"}
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {**row, "status": "error: no JSON summary on stdout"}
    ok = summary.get("step") == summary.get("total_steps") == 2
    return {**row, "status": "ok" if ok else f"error: steps {summary.get('step')}/{summary.get('total_steps')}",
            "val_top1": summary.get("val_top1")}


def recipes(dry: bool, scratch: Path, context: dict) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    shards = make_shards(scratch / "data")
    runs = _recipe_runs(dry, shards, scratch / "runs")
    left = context.get("budget", 240) - (time.perf_counter() - started) - 10
    each = max(15.0, left / -(-len(runs) // (1 if dry else 3)))  # per launch: the waves fit the budget
    with ThreadPoolExecutor(1 if dry else 3) as pool:  # 3 at a time share the GPU: start-up dominates
        rows = list(pool.map(lambda r: _launch(*r, timeout=each), runs))
    passed = sum(r["status"] == "ok" for r in rows)
    return {"status": "ok" if passed == len(rows) else f"{len(rows) - passed} of {len(rows)} failed",
            "runs": rows, "note": "" if not dry else "dry run: quickstart only, on CPU"}


def overhead(dry: bool, scratch: Path, context: dict) -> dict:
    """rtrain's train step / a bare PyTorch loop (same model, batch, bf16 autocast, channels_last, SGD)."""
    from rtrain.engine.step import Normalizer

    device = _device(dry)
    name, size, batch, steps, rounds = ("resnet18", 32, 4, 1, 2) if dry else ("resnet50", 224, 128, 10, 5)
    x, y = _batch(batch, size, 1000, device)
    step, _ = _rtrain_step(name, device)
    from rtrain.models import build
    torch.manual_seed(0)
    model = build(name).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    xf = Normalizer(MEAN, STD, device, True)(x)

    def bare():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xf), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours = lambda: step(x, y)
    ratios, t_bare, t_ours = [], [], []
    for r in range(rounds):
        order = (bare, ours) if r % 2 == 0 else (ours, bare)
        t = {id(fn): _seconds_per_step(fn, device, steps, warmup=1 if r == 0 else 0) for fn in order}
        t_bare.append(t[id(bare)])
        t_ours.append(t[id(ours)])
        ratios.append(t[id(ours)] / t[id(bare)])
    return {"status": "ok", "model": name, "batch": batch, "image": size, "device": str(device),
            "bare_ms": round(statistics.median(t_bare) * 1e3, 2),
            "rtrain_ms": round(statistics.median(t_ours) * 1e3, 2),
            "ratio_vs_bare": round(statistics.median(ratios), 4), "goal": "<= 1.03"}


def lars(dry: bool, scratch: Path, context: dict) -> dict:
    """LARS / fused SGD: the whole train step, and the optimizer step alone (benchmarks/lars.py's timer)."""
    from benchmarks.lars import _lars, _ms_per_step, _with_random_grads
    from rtrain.models import build
    from rtrain.optim import param_groups

    device = _device(dry)
    name, size, batch, steps = ("resnet18", 32, 4, 1) if dry else ("resnet50", 224, 128, 10)
    x, y = _batch(batch, size, 1000, device)
    fused = device.type == "cuda"
    train = {}
    for optim, kw in (("sgd", {"fused": fused or None}), ("lars", {})):
        step, _ = _rtrain_step(name, device, optim, **kw)
        train[optim] = _seconds_per_step(lambda s=step: s(x, y), device, steps)
    model = _with_random_grads(build(name), device.type)
    opts = {"lars": _lars(model, foreach=True),
            "sgd": torch.optim.SGD(param_groups(model, 5e-5), lr=0.1, momentum=0.9, fused=fused or None)}
    optim_ms = {}
    for key, opt in opts.items():
        _ms_per_step(opt, 1, device.type)
        optim_ms[key] = statistics.median(_ms_per_step(opt, max(steps, 3), device.type) for _ in range(3))
    return {"status": "ok", "model": name, "device": str(device), "sgd_fused": fused,
            "train_step_ms": {k: round(v * 1e3, 2) for k, v in train.items()},
            "ratio_lars_vs_fused_sgd_step": round(train["lars"] / train["sgd"], 4),
            "optimizer_step_ms": {k: round(v, 3) for k, v in optim_ms.items()},
            "ratio_lars_vs_fused_sgd_optimizer_only": round(optim_ms["lars"] / optim_ms["sgd"], 4),
            "goal": "<= 1.5 (train step)"}


def checkpoint(dry: bool, scratch: Path, context: dict) -> dict:
    from benchmarks.checkpoint import run

    device = _device(dry)
    name, repeats = ("resnet18", 1) if dry else ("resnet152", 3)
    (scratch / "ckpt").mkdir(parents=True, exist_ok=True)
    median, total_bytes = run(name, device.type, repeats, scratch / "ckpt")
    return {"status": "ok", "model": name, "device": str(device), "bytes": total_bytes,
            "seconds": {k: round(v, 4) for k, v in median.items()},
            "ratio_sync_save_vs_plain_write": round(median["sync"] / median["plain"], 4),
            "ratio_async_vs_sync_blocking": round(median["async_block"] / median["sync_block"], 4)}


def throughput(dry: bool, scratch: Path, context: dict, compiled_only: bool = False) -> dict:
    device = _device(dry)
    size, batch, steps = (32, 4, 1) if dry else (224, 128, 15)
    cases = [("resnet18", False)] if dry else [("resnet50", False), ("resnet152", False)]
    if compiled_only:
        cases = [("resnet18", True)] if dry and CUDA else [] if dry else [("resnet152", True)]
    rows = {}
    for name, compiled in cases:
        key = name + (" compiled" if compiled else "")
        try:
            step, _ = _rtrain_step(name, device, "sgd", fused=True if device.type == "cuda" else None,
                                   compile_=compiled)
            x, y = _batch(batch, size, 1000, device)
            seconds = _seconds_per_step(lambda s=step, a=x, b=y: s(a, b), device, steps, warmup=3 if compiled else 2)
            rows[key] = {"img_per_s": round(batch / seconds, 1), "step_ms": round(seconds * 1e3, 2)}
        except Exception as exc:  # noqa: BLE001 -- one case failing (compile) leaves the others
            rows[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    if dry and compiled_only:
        rows["resnet152 compiled"] = {"status": SKIP}
    ref = "(fill from NVIDIA DeepLearningExamples ResNet-50 v1.5 performance table, name the GPU)"
    return {"status": "ok", "device": str(device), "batch": batch, "image": size, "precision": "bf16 channels_last",
            "per_gpu": rows, "reference": {"resnet50 bf16/AMP training img/s per GPU": ref,
                                           "resnet152": ref.replace("ResNet-50 v1.5", "ResNet-152 / ResNeXt")}}


def loader(dry: bool, scratch: Path, context: dict) -> dict:
    """rtrain's loader img/s at 8 and 15 workers against the GPU's ResNet-50 rate, and the wait fraction."""
    import benchmarks.loader as bench_loader
    from benchmarks.loader import folder_items, run_rtrain, write_shards
    from data_prep.synthetic import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(classes=4, per_class=16, val_per_class=0, quirks=False, image_size=(64, 48)) if dry \
        else SyntheticSpec(classes=8, per_class=128, val_per_class=0, quirks=False)
    write_synthetic(scratch / "jpegs", spec)
    bench_loader.SHARD_SAMPLES = 8 if dry else 32  # more shards than the 15 workers
    write_shards(folder_items(scratch / "jpegs"), scratch / "shards")
    counts, batch = ((0, 1), 8) if dry else ((8, 15), 128)
    rates = {str(w): round(run_rtrain(scratch / "shards", w, batch, epoch=0), 1) for w in counts}
    per_gpu = (context.get("throughput") or {}).get("per_gpu", {})
    gpu = per_gpu.get("resnet18" if dry else "resnet50", {}).get("img_per_s")
    waited = _wait_fraction(dry, scratch / "shards", counts[-1], batch)
    return {"status": "ok", "cpu_cores": os.cpu_count(), "batch": batch, "images": spec.classes * spec.per_class,
            "loader_img_per_s": rates, "gpu_resnet50_img_per_s": gpu,
            "loader_vs_gpu": {w: round(r / gpu, 3) for w, r in rates.items()} if gpu else "no GPU rate",
            **waited}


def _wait_fraction(dry: bool, shards: Path, workers: int, batch: int) -> dict:
    """Feed rtrain's ResNet-50 step from the loader; the share of wall time spent in next(loader)."""
    from rtrain.config import DataConfig
    from rtrain.data import build_loader

    device = _device(dry)
    step, _ = _rtrain_step("resnet18" if dry else "resnet50", device, "sgd")
    cfg = DataConfig(source=str(shards), num_workers=workers, pin_memory=device.type == "cuda",
                     **({"image_size": 32} if dry else {}))
    data = build_loader(cfg, "train", rank=0, world_size=1, batch_size=batch, seed=0, train=True)
    data.set_epoch(1)
    it, waited, steps = iter(data), 0.0, 0
    x, y = next(it)
    step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))  # warm-up: workers, cudnn
    _sync(device)
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        waited += time.perf_counter() - t0
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        _sync(device)
        steps += 1
    total = time.perf_counter() - start
    return {"fed_steps": steps, "fed_img_per_s": round(steps * batch / total, 1) if total else None,
            "data_wait_fraction": round(waited / total, 4) if total else None, "fed_workers": workers}


def throughput_compiled(dry: bool, scratch: Path, context: dict) -> dict:
    """ResNet-152 under torch.compile: its own section (and budget), as compiling may take a minute."""
    return throughput(dry, scratch, context, compiled_only=True)


SECTIONS = {"cuda_tests": cuda_tests, "recipes": recipes, "step_overhead": overhead, "lars": lars,
            "checkpoint": checkpoint, "throughput": throughput, "throughput_compiled": throughput_compiled,
            "loader": loader}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, required=True)
    ap.add_argument("--context", type=Path, default=None, help="JSON: the budget, earlier sections' results")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    context = json.loads(args.context.read_text()) if args.context else {}
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(min(4, torch.get_num_threads()))
    result = SECTIONS[args.section](args.dry_run, args.scratch, context)
    args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
