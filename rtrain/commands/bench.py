"""`rtrain bench RECIPE [key=value ...]`: is this recipe input-bound or compute-bound on this machine?

Two measurements, one after the other, each alone on the machine:
- the loader: the recipe's train loader for one rank (its data.num_workers worker processes, its batch per
  worker, its augmentation) over `--loader-batches` batches after the first (worker start-up excluded);
  images/s in total and per worker process;
- the model: the recipe's training step (model, optimizer, precision, memory format, accumulation) on this
  device, single process, on one real batch from the loader repeated, over `--steps` steps after
  `--warmup` steps; images/s.
Then which one limits a rank and by how much. In a real run both share the host's cores (on a CPU-only
machine they compete), so the slower of the two is an upper bound on what a rank reaches.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from rtrain.config import Recipe


class BenchError(ValueError):
    """The recipe cannot be benchmarked here (e.g. too little data for the batches asked for)."""


@dataclass(frozen=True)
class BenchResult:
    loader_images_per_s: float
    loader_workers: int
    model_images_per_s: float
    device: str

    @property
    def loader_per_worker(self) -> float:
        return self.loader_images_per_s / max(1, self.loader_workers)

    def verdict(self) -> str:
        loader, model = self.loader_images_per_s, self.model_images_per_s
        if loader < model:
            return (f"bottleneck: the input pipeline. The model could take {model / loader:.2f}x what the loader "
                    f"delivers ({model:.1f} vs {loader:.1f} img/s): more data.num_workers (each adds about "
                    f"{self.loader_per_worker:.1f} img/s where cores are free), smaller shards (data_prep "
                    "--max-side) or data.backend: dali on a GPU")
        return (f"bottleneck: the model step. The loader delivers {loader / model:.2f}x what the model takes "
                f"({loader:.1f} vs {model:.1f} img/s): the input pipeline keeps up")


def _progress(label: str, total: int, unit: str = "batch") -> Callable[[int], None]:
    """A one-line progress bar on stderr (tqdm's, without its import cost at parse time)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return advance


def _timed(items: Iterable[Any], count: int, advance: Callable[[int], None]) -> tuple[int, float, Any]:
    """(images after the first batch, their seconds, the first batch) over the first count + 1 batches."""
    iterator = iter(items)
    first = next(iterator, None)
    if first is None:
        raise BenchError("the train split gave no batch")
    images, start = 0, time.perf_counter()
    for done in range(1, count + 1):
        batch = next(iterator, None)
        if batch is None:
            raise BenchError(f"the train split has fewer than {count + 1} batches of this recipe's size: "
                             "ask for fewer with --loader-batches")
        images += len(batch[0])
        advance(done)
    return images, time.perf_counter() - start, first


def measure_loader(recipe: Recipe, batches: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor], int]:
    """(images/s of one rank's train loader, its first batch, the split's number of classes)."""
    from rtrain.data import build_loader

    data = recipe.data
    loader = build_loader(data, data.train_split, rank=0, world_size=1, batch_size=recipe.per_worker_batch,
                          seed=recipe.run.seed, train=True)
    loader.set_epoch(0)
    images, seconds, first = _timed(loader, batches, _progress("loader", batches))
    return images / seconds, first, len(loader.classes)


def measure_model(recipe: Recipe, batch: tuple[torch.Tensor, torch.Tensor], num_classes: int, steps: int,
                  warmup: int) -> tuple[float, str]:
    """(images/s of the recipe's training step on this device, the device's name)."""
    from rtrain.distributed.env import DistEnv, init_distributed
    from rtrain.distributed.factory import backend_from_config, place_model
    from rtrain.engine.step import Normalizer, TrainStep
    from rtrain.models import model_from_config
    from rtrain.optim import optimizer_from_config

    data = recipe.data
    device = init_distributed(DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 29500, "single"), recipe.dist.use_gpu)
    model = model_from_config(recipe.model, num_classes, recipe.run.seed)
    model = place_model(model, recipe.dist, 1, device, data.channels_last)
    optimizer = optimizer_from_config(model, recipe.optim, lr=0.01)
    backend = backend_from_config(model, optimizer, device, dist=recipe.dist, precision=recipe.precision,
                                  train=recipe.train, micro_batch=recipe.micro_batch)
    step = TrainStep(backend, Normalizer(data.mean, data.std, device, data.channels_last), recipe.precision,
                     accumulation_steps=recipe.train.accumulation_steps, label_smoothing=recipe.train.label_smoothing)
    images, labels = batch
    labels = labels % num_classes
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    advance = _progress("model step", warmup + steps, unit="step")
    try:
        for done in range(1, warmup + 1):
            step(images, labels)
            advance(done)
        sync()
        start = time.perf_counter()
        for done in range(warmup + 1, warmup + steps + 1):
            step(images, labels)
            advance(done)
        sync()
        seconds = time.perf_counter() - start
    finally:
        backend.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return steps * len(images) / seconds, name


def bench(recipe: Recipe, loader_batches: int, steps: int, warmup: int) -> BenchResult:
    if loader_batches < 1 or steps < 1 or warmup < 0:
        raise BenchError("--loader-batches and --steps must be >= 1, --warmup >= 0")
    loader_rate, batch, split_classes = measure_loader(recipe, loader_batches)
    classes = recipe.model.num_classes or split_classes
    model_rate, device = measure_model(recipe, batch, max(1, classes), steps, warmup)
    return BenchResult(loader_rate, recipe.data.num_workers, model_rate, device)


def report(recipe: Recipe, result: BenchResult) -> str:
    from rtrain.data import decode

    workers = result.loader_workers
    return "\n".join([
        f"recipe: model {recipe.model.name}, {recipe.per_worker_batch} images per rank and step, "
        f"image size {recipe.data.image_size}, precision {recipe.precision.dtype}, "
        f"channels_last {recipe.data.channels_last}",
        f"loader: {result.loader_images_per_s:9.1f} img/s with {workers} worker process(es) "
        f"({result.loader_per_worker:.1f} img/s per worker); {decode.region_decoding_state()}",
        f"model:  {result.model_images_per_s:9.1f} img/s training step on {result.device}",
        result.verdict(),
    ])


def run(args: argparse.Namespace) -> int:
    from rtrain.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    result = bench(recipe, args.loader_batches, args.steps, args.warmup)
    print(report(recipe, result))
    return 0
