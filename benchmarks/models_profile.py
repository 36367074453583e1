"""How long the `rtrain models` table (rtrain.models.model_rows) takes, against two baselines.

    python -m benchmarks.models_profile [--repeats 3] [--skip-cpu]

Every registered model (ImageNet at 224, CIFAR at 32, ResNet-1202 included) gets params and
multiply-adds. Variants, each timed in this run (median of --repeats; alternating so drifting load
hits all alike):
  model_rows   the shipped path: build on the meta device, swap norm layers out, count
  meta + BN    build on meta and count with BN left in (torch's Python BN decompositions run)
  cpu          build on CPU with real init and count with a real forward pass (--skip-cpu omits)
The figures of all three must agree; the script checks that before printing the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rtrain.models import build, count_macs, count_params, list_models, model_info, model_rows


def rows_built_on(device: str) -> list[dict]:
    rows = []
    for name in list_models():
        size = model_info(name).input_size
        with torch.device(device):
            model = build(name)
        rows.append(
            {
                "name": name,
                "params": count_params(model),
                "macs": count_macs(model, size),
                "input_size": size,
            }
        )
    return rows


def timed(fn: Callable[[], list[dict]]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = fn()
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true", help="omit the CPU baseline")
    args = parser.parse_args()
    variants: dict[str, Callable[[], list[dict]]] = {
        "model_rows": model_rows,
        "meta + BN": lambda: rows_built_on("meta"),
    }
    if not args.skip_cpu:
        variants["cpu"] = lambda: rows_built_on("cpu")
    model_rows()  # first call pays one-off lazy imports (sympy etc.) for every variant
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    reference = None
    for _ in range(args.repeats):
        with torch.no_grad():
            for name, fn in variants.items():
                elapsed, rows = timed(fn)
                seconds[name].append(elapsed)
                reference = reference or rows
                if rows != reference:
                    raise SystemExit(f"variant {name!r} disagrees with model_rows")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    print(f"{len(reference)} models, torch threads {torch.get_num_threads()}")
    for name, value in median.items():
        print(
            f"{name:>12}: {value:7.2f} s  ({median[name] / median['model_rows']:5.2f}x model_rows)"
        )


if __name__ == "__main__":
    main()
