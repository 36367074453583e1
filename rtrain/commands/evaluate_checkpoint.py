"""`rtrain eval CHECKPOINT_OR_RUN`: the paper's testing of a checkpoint on the val split of its shards.

The model is rebuilt from the recipe stored with the checkpoint; the data is the recipe's (or --data's) val
split, read by the same loader as training-time evaluation (center, ten_crop) or as whole images
(multi_scale). One process: CUDA if there is one (with the recipe's precision), else the CPU in fp32.

The views are sized to the model's input (data.image_size), as timm sizes its eval transform to the model:
ten_crop cuts image_size patches from the data.eval_resize square where that fits (1x to 2x the crop), and from
a square of image_size x 256/224 where the recipe's CIFAR transform never used eval_resize (a 32-px model: 36);
multi_scale defaults to the paper's scales times image_size / 224. A view that still does not fit is named in a
warning on stderr, one that cannot be cut at all (a square smaller than the crop) is refused (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from rtrain.commands.checkpoint_source import CheckpointModel, CommandError, load_checkpoint_model
from rtrain.config import PrecisionConfig
from rtrain.data import build_eval_loader
from rtrain.data.sources import ShardSource
from rtrain.engine.eval_views import scales_for, scales_note, ten_crop_square
from rtrain.engine.evaluate import evaluate
from rtrain.engine.step import Normalizer


def _first_images(batches: Iterable, limit: int) -> Iterator[tuple[Any, torch.Tensor]]:
    left = limit
    for images, labels in batches:
        if left <= 0:
            return
        yield images[:left], labels[:left]
        left -= len(labels)


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _evaluate(source: CheckpointModel, args: argparse.Namespace) -> dict[str, Any]:
    recipe = source.recipe
    if recipe.data.backend != "webdataset":
        print(f"rtrain eval: data.backend={recipe.data.backend} is a training loader; reading with rtrain's "
              "webdataset loader", file=sys.stderr)
    data = recipe.data.model_copy(update={"source": args.data or recipe.data.source, "backend": "webdataset"})
    notes: list[str | None] = []
    square = None
    if args.mode == "ten_crop":  # fails before any data is read where the 10 crops cannot be cut
        try:
            fit = ten_crop_square(data.image_size, data.eval_resize, data.eval_transform)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        square = fit.side
        notes.append(fit.note)
    try:
        shards = ShardSource(data.source, data.val_split, data.storage_options, data.allowed_shard_roots)
        manifest = shards.read_manifest()
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise CommandError(f"data: {exc}") from None
    classes = getattr(getattr(source.model, "fc", None), "out_features", None)
    if classes is not None and manifest.num_classes > classes:
        raise CommandError(f"{data.source}/{data.val_split}: {manifest.num_classes} classes, the model "
                           f"{recipe.model.name} has {classes}")
    count = min(args.limit or manifest.num_samples, manifest.num_samples)
    if count == 0:
        raise CommandError(f"{data.source}/{data.val_split}: the split has no samples")
    batch = min(args.batch_size or recipe.eval.batch_size or recipe.micro_batch, count)
    scales = args.scales or list(recipe.eval.scales) or scales_for(data.image_size)
    if args.mode == "multi_scale":
        notes.append(scales_note(data.image_size, scales))
    for note in filter(None, notes):
        print(f"rtrain eval: {note}", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = recipe.precision if device.type == "cuda" else PrecisionConfig(dtype="fp32")
    loader = build_eval_loader(data, data.val_split, mode=args.mode, rank=0, world_size=1, batch_size=batch,
                               seed=recipe.run.seed, scales=scales)
    model = source.model.to(device, memory_format=torch.channels_last if data.channels_last
                            else torch.preserve_format)
    normalizer = Normalizer(data.mean, data.std, device, data.channels_last)
    result = evaluate(model, _first_images(loader, count), normalizer, precision, mode=args.mode,
                      crop=data.image_size, scales=scales)
    return {"checkpoint": str(source.loaded.path), "step": source.loaded.step, "model": recipe.model.name,
            "data": f"{data.source.rstrip('/')}/{data.val_split}", "mode": args.mode,
            "scales": scales if args.mode == "multi_scale" else None, "image_size": data.image_size,
            "ten_crop_square": square, "device": device.type,
            "precision": precision.dtype, "images": int(result["samples"]),
            "skipped": int(loader.stats.get("skipped_samples", 0)), "top1_error": result["top1_error"],
            "top5_error": result["top5_error"], "loss": result["loss"]}


def print_report(report: dict[str, Any]) -> None:
    views = {"center": "one view",
             "ten_crop": f"10 crops of {report['image_size']} px from a {report['ten_crop_square']}-px square and "
                         "their mirrors, softmax averaged",
             "multi_scale": f"whole image + mirror at shorter sides {report['scales']}, softmax averaged"}
    print(f"checkpoint   {report['checkpoint']} (step {report['step']}, {report['model']})")
    print(f"data         {report['data']}: {report['images']} images ({report['skipped']} skipped), "
          f"{report['device']} {report['precision']}")
    print(f"mode         {report['mode']} ({views[report['mode']]})")
    print(f"top-1 error  {100 * report['top1_error']:.2f} %")
    print(f"top-5 error  {100 * report['top5_error']:.2f} %")
    print(json.dumps(report))


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    report = _evaluate(load_checkpoint_model(args.checkpoint), args)
    print_report(report)
    sys.stdout.flush()
    return 0
