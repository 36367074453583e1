"""The per-worker entry point: one call per training process.

`run_worker({"recipe_yaml": ...})` runs unchanged as Ray Train's train_loop_per_worker and under a plain
torch.distributed launch (RANK/WORLD_SIZE/MASTER_ADDR in the environment). It is the one place where the
engine meets checkpointing and tracking (the engine only gets them handed in).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Any

import torch

from rtrain.checkpoint import CheckpointManager, Loaded
from rtrain.checkpoint_io import load_weights_file
from rtrain.config import Recipe, loads_recipe
from rtrain.data import build_loader
from rtrain.dist.backend import Backend, DDPBackend
from rtrain.dist.env import detect_env, init_distributed, shutdown_distributed
from rtrain.dist.syncbn import convert_sync_batchnorm
from rtrain.engine.ema import ModelEMA
from rtrain.engine.evaluate import evaluate
from rtrain.engine.loop import FitParts, fit, restore
from rtrain.engine.precision import build_scaler
from rtrain.engine.step import Normalizer, TrainStep
from rtrain.models import build as build_model
from rtrain.models import model_info
from rtrain.optim import build_optimizer
from rtrain.optim.schedule import LRSchedule
from rtrain.tracking import build_tracker

log = logging.getLogger("rtrain.worker")


def model_from_recipe(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    m = recipe.model
    info = model_info(m.name)
    options: dict[str, Any] = {"num_classes": num_classes, "zero_init_residual": m.zero_init_residual,
                               "checkpoint_stages": m.checkpoint_stages}
    if m.shortcut is not None:
        options["shortcut"] = m.shortcut
    if info.family == "imagenet":
        options["stride_in"] = m.stride_in
    if m.depth is not None:
        options["depth"] = m.depth
    torch.manual_seed(recipe.run.seed)  # identical initial weights on every rank
    model = build_model(m.name, **options)
    if m.init_from:
        from rtrain.models.weights import import_torchvision

        state = load_weights_file(m.init_from)
        head = state.get("fc.weight")
        if head is not None and head.shape[0] != num_classes:
            # Fine-tuning onto another label set: keep the backbone, the new head stays freshly initialised.
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            import_torchvision(model, state, strict=False)
        else:
            import_torchvision(model, state)
    return model


def optimizer_from_recipe(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.optim
    extra: dict[str, Any] = {}
    if o.name == "sgd":
        extra["nesterov"] = o.nesterov
    elif o.name == "lars":
        extra.update(eta=o.eta, eps=o.eps)
    else:
        extra["betas"] = tuple(o.betas)
    return build_optimizer(model, o.name, lr=recipe.peak_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           impl=o.impl, fused=o.fused, exclude_bn_bias=o.exclude_bn_bias, **extra)


def schedule_from_recipe(recipe: Recipe, steps_per_epoch: int, total_steps: int) -> LRSchedule:
    s = recipe.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)
    milestones = s.milestones_steps if s.milestones_steps is not None else [
        round(e * steps_per_epoch) for e in s.milestones_epochs]
    return LRSchedule(kind=s.kind, base_lr=recipe.peak_lr, total_steps=total_steps,
                      warmup_steps=min(warmup, total_steps), milestones=tuple(milestones), gamma=s.gamma,
                      end_lr=s.end_lr, power=s.power, warmup_start_lr=s.warmup_start_lr)


def backend_from_recipe(recipe: Recipe, model: torch.nn.Module, optimizer: Any, device: torch.device) -> Backend:
    p, d = recipe.precision, recipe.dist
    if d.engine == "deepspeed":
        from rtrain.dist.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(
            model, optimizer, device=device, precision_dtype=p.dtype, fp16_dynamic=p.scaler == "dynamic",
            init_scale=p.init_scale, growth_interval=p.growth_interval, static_scale=p.static_scale,
            zero_stage=d.zero_stage, micro_batch_per_gpu=recipe.micro_batch,
            accumulation_steps=recipe.train.accumulation_steps, clip_grad_norm=recipe.train.clip_grad_norm)
    return DDPBackend(model, optimizer, build_scaler(p, device), device=device,
                      clip_grad_norm=recipe.train.clip_grad_norm, bucket_cap_mb=d.bucket_cap_mb,
                      static_graph=d.static_graph, compile_model=recipe.train.compile)


def _eval_fn(recipe: Recipe, rank: int, world: int, normalizer: Normalizer):
    e, data = recipe.eval, recipe.data
    mode = "ten_crop" if e.ten_crop else ("multi_scale" if e.scales else "center")
    cfg = data if mode == "center" else data.model_copy(update={"image_size": data.eval_resize})
    loader = build_loader(cfg, data.val_split, rank=rank, world_size=world,
                          batch_size=e.batch_size or recipe.micro_batch, seed=recipe.run.seed, train=False)

    passes = itertools.count()

    def run(model: torch.nn.Module) -> dict[str, float]:
        loader.set_epoch(next(passes))  # a new pass from the start; eval covers every sample each time
        return evaluate(model, loader, normalizer, recipe.precision, mode=mode, crop=data.image_size,
                        scales=list(e.scales))

    return run


def _resume(recipe: Recipe, manager: CheckpointManager) -> Loaded | None:
    choice = recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":
        return manager.latest()
    return manager.load(choice)


def _train(recipe: Recipe) -> dict[str, Any]:
    env = detect_env()
    device = init_distributed(env, recipe.dist.use_gpu)
    rank, world = env.rank, env.world_size
    data = recipe.data
    train_loader = build_loader(data, data.train_split, rank=rank, world_size=world,
                                batch_size=recipe.per_worker_batch, seed=recipe.run.seed, train=True)
    model = model_from_recipe(recipe, recipe.model.num_classes or len(train_loader.classes))
    if recipe.dist.syncbn != "off" and world > 1:
        model = convert_sync_batchnorm(model, impl=recipe.dist.syncbn, group_size=recipe.dist.bn_group_size)
    memory_format = torch.channels_last if data.channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    optimizer = optimizer_from_recipe(recipe, model)
    backend = backend_from_recipe(recipe, model, optimizer, device)
    normalizer = Normalizer(data.mean, data.std, device, data.channels_last)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"data.source={data.source}: fewer training samples than one global batch "
                         f"(train.global_batch={recipe.train.global_batch})")
    total_steps = recipe.train.max_steps or math.ceil(recipe.train.epochs * steps_per_epoch)
    manager = CheckpointManager(recipe.checkpoint_dir, keep=recipe.checkpoint.keep, rank=rank,
                                world_size=world, async_save=recipe.checkpoint.async_save)
    parts = FitParts(
        recipe=recipe, backend=backend, normalizer=normalizer, train_loader=train_loader,
        train_step=TrainStep(backend, normalizer, recipe.precision,
                             accumulation_steps=recipe.train.accumulation_steps,
                             label_smoothing=recipe.train.label_smoothing),
        evaluate=_eval_fn(recipe, rank, world, normalizer),
        schedule=schedule_from_recipe(recipe, steps_per_epoch, total_steps), total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, checkpointer=manager, rank=rank,
        ema=ModelEMA(model, recipe.train.ema_decay) if recipe.train.ema_decay else None)
    loaded = _resume(recipe, manager)
    if loaded is not None:
        restore(parts, loaded.shared, loaded.per_rank)
        log.info("rank %d resumed from %s at step %d", rank, loaded.path, parts.state.step)
    tracker = build_tracker(recipe, rank, resume_state=(loaded.meta.get("tracking") if loaded else None))
    parts.tracker = tracker
    try:
        summary = fit(parts)
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        manager.close()
        backend.close()
    saved = manager.list()
    summary.update(checkpoint=str(saved[0]) if saved else None,
                   run_id=getattr(tracker, "run_id", None), world_size=world, total_steps=total_steps)
    tracker.finish("FINISHED")
    return summary if rank == 0 else {}


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=os.environ.get("RTRAIN_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    recipe = loads_recipe(config["recipe_yaml"], where="recipe")
    try:
        summary = _train(recipe)
        _report_to_ray(summary)
        return summary
    finally:
        shutdown_distributed()


def _report_to_ray(summary: dict[str, Any]) -> None:
    """Under Ray Train, hand rank 0's summary to the driver (every rank must call report)."""
    try:
        import ray.train

        ray.train.get_context()
    except Exception:  # not inside a Ray Train worker
        return
    ray.train.report(metrics={k: v for k, v in summary.items() if v is not None})
