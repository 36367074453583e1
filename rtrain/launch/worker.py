"""The per-worker entry point and the composition root: the one place that wires the components together.

`run_worker({"recipe_yaml": ...})` runs unchanged as Ray Train's train_loop_per_worker and under a plain
torch.distributed launch (RANK/WORLD_SIZE/MASTER_ADDR in the environment). Every component builds itself
from its own recipe section; this file only hands them to each other: set up, resume, fit, report.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from rtrain._errors import DEBUG_ENV
from rtrain._process import HEAD_LOST_NOTE, write_stall_note
from rtrain.checkpoint import CheckpointError, CheckpointManager, Loaded, open_checkpoints
from rtrain.config import Recipe, loads_recipe
from rtrain.data import build_loader, steps_per_epoch
from rtrain.data.ledger import ledger_path
from rtrain.data.suspects import CrashGuard
from rtrain.data.worker import LoaderStall
from rtrain.distributed.agree import StepAgreement
from rtrain.distributed.env import detect_env, init_distributed, shutdown_distributed
from rtrain.distributed.factory import backend_from_config, place_model
from rtrain.distributed.ray_cluster import HeadWatch
from rtrain.distributed.waits import CollectiveClock
from rtrain.distributed.watchdog import StallWatchdog
from rtrain.engine.ema import ModelEMA
from rtrain.engine.evaluate import evaluator_from_config
from rtrain.engine.loop import FitParts, fit, restore
from rtrain.engine.rng import reseed_rng
from rtrain.engine.step import Normalizer, TrainStep
from rtrain.launch.signals import RankStopWatch
from rtrain.launch.errors import EXPECTED_ERRORS
from rtrain.models import model_from_config
from rtrain.optim import LRSchedule, optimizer_from_config
from rtrain.tracking import build_tracker
from rtrain.tracking.null import run_id_from_state
from rtrain.tracking.events import EventLog, read_events
from rtrain.tracking.goodput import GoodputMeter, attempt_tags
from rtrain.tracking.artifacts import layer_response_hook, log_final_weights, track_checkpoints
from rtrain.tracking.run_info import TAG_HOSTS, describe_run, hosts_by_rank
from rtrain.tracking.stragglers import StragglerWatch
from rtrain.tracking.system_metrics import node_metrics, shared_run_id

log = logging.getLogger("rtrain.launch.worker")


def _train(recipe: Recipe) -> dict[str, Any]:
    env = detect_env()
    device = init_distributed(env, recipe.dist.use_gpu, timeout_s=recipe.dist.collective_timeout_s)
    with StallWatchdog(recipe.run_dir, env.rank, env.world_size, recipe.dist.stall_timeout_s) as watchdog, \
            EventLog(recipe.run_dir, env.rank, watchdog.attempt) as events, events.mirroring(), \
            HeadWatch(recipe.dist.ray_head_timeout_s, _end_rank(env.rank, recipe.run_dir, events=events)) as head:
        meter = GoodputMeter(read_events(events.path)) if env.rank == 0 else None  # read before this attempt writes
        if meter is not None:
            events.observers.append(meter.observe)
        events.emit("attempt", world_size=env.world_size, pid=os.getpid())
        try:
            summary = _set_up_and_fit(recipe, env, device, watchdog, head, events, meter)
        except BaseException as exc:
            events.emit("end", reason="killed" if isinstance(exc, KeyboardInterrupt) else "failed",
                        error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
            raise
        events.emit("end", reason="preempted" if summary.get("preempted") else "finished", step=summary.get("step"),
                    signal=summary.get("signal"))
        return summary


def _set_up_and_fit(recipe: Recipe, env: Any, device: torch.device, watchdog: StallWatchdog,
                    head: HeadWatch, events: EventLog, meter: GoodputMeter | None) -> dict[str, Any]:
    rank, world, data, train = env.rank, env.world_size, recipe.data, recipe.train
    guard = CrashGuard(recipe.run_dir, watchdog.folder, watchdog.attempt, rank) if watchdog.folder else None
    train_loader = build_loader(data, data.train_split, rank=rank, world_size=world,
                                batch_size=recipe.per_worker_batch, seed=recipe.run.seed, train=True,
                                ledger=ledger_path(recipe.run_dir, rank) if data.sample_ledger else None,
                                guard=guard)
    watchdog.on_stall = _suspect_recorder(guard, train_loader)
    epoch_steps = steps_per_epoch(train_loader, data, train.global_batch)
    total_steps = train.max_steps or math.ceil(train.epochs * epoch_steps)
    schedule = LRSchedule.from_config(recipe.schedule, recipe.peak_lr, epoch_steps, total_steps)
    model = model_from_config(recipe.model, recipe.model.num_classes or len(train_loader.classes), recipe.run.seed)
    clock = CollectiveClock() if recipe.tracking.rank_timing else None
    model = place_model(model, recipe.dist, world, device, data.channels_last, clock=clock)
    optimizer = optimizer_from_config(model, recipe.optim, lr=schedule.lr_at(0))
    backend = backend_from_config(model, optimizer, device, dist=recipe.dist, precision=recipe.precision,
                                  train=train, micro_batch=recipe.micro_batch, clock=clock)
    normalizer = Normalizer(data.mean, data.std, device, data.channels_last)
    manager = open_checkpoints(recipe.checkpoint_dir, keep=recipe.checkpoint.keep, rank=rank, world_size=world,
                               async_save=recipe.checkpoint.async_save, save_tag=watchdog.attempt,
                               staging=recipe.run_dir / CHECKPOINT_STAGING,
                               retry_s=recipe.checkpoint.upload_retry_s)
    stop_watch = RankStopWatch(recipe.run_dir, StepAgreement())
    parts = FitParts(
        train=train, precision=recipe.precision, evaluation=recipe.eval, checkpoint=recipe.checkpoint,
        backend=backend, train_loader=train_loader,
        evaluate=evaluator_from_config(recipe, rank=rank, world_size=world, normalizer=normalizer),
        train_step=TrainStep(backend, normalizer, recipe.precision, accumulation_steps=train.accumulation_steps,
                             label_smoothing=train.label_smoothing),
        schedule=schedule, total_steps=total_steps, steps_per_epoch=epoch_steps, checkpointer=manager,
        rank=rank, ema=ModelEMA(model, train.ema_decay) if train.ema_decay else None,
        meta={"recipe_yaml": recipe.to_yaml()}, should_stop=stop_watch.requested, progress=watchdog.beat,
        events=events.emit, collective_s=(lambda: clock.seconds) if clock is not None else None)
    loaded = _resume(recipe, manager)
    if loaded is not None:
        _restore(parts, loaded, manager, recipe.run.seed)
    hosts = hosts_by_rank()  # every rank: a collective
    run_tags = describe_run(world, epoch_steps, hosts)
    quarantine = getattr(train_loader, "quarantine", None)
    if quarantine:
        run_tags["rtrain.quarantined"] = ", ".join(quarantine.names())[:4000]
    # Records stay true: only this run's own checkpoints (in its checkpoint folder, which the run directory's
    # owner holds) continue their MLflow run; another run's checkpoint (checkpoint.resume=PATH) starts a new
    # MLflow run linked to its source, and the source run is never reopened or written to.
    own = loaded is not None and _inside(loaded.path, manager.root)
    if loaded is not None and not own:
        run_tags[TAG_RESUMED_FROM_CHECKPOINT] = str(loaded.path)
        if source_run := run_id_from_state(loaded.meta.get("tracking")):
            run_tags[TAG_RESUMED_FROM_RUN] = source_run
    parts.tracker = build_tracker(recipe, rank, resume_state=loaded.meta.get("tracking") if own else None,
                                  run_tags=run_tags, resume_step=loaded.step if own else None)
    head.on_lost = _end_rank(rank, recipe.run_dir, parts.tracker, events)  # a lost Ray head: MLflow run FAILED
    parts.checkpointer = track_checkpoints(manager, parts.tracker, recipe.tracking.log_checkpoints, rank)
    parts.after_epoch = layer_response_hook(recipe, rank, parts.tracker, normalizer)
    mlflow = {"run_id": getattr(parts.tracker, "run_id", None), "uri": getattr(parts.tracker, "uri", None),
              "experiment": recipe.tracking.experiment} if rank == 0 and recipe.tracking.enabled else None
    events.emit("start", step=parts.state.step, total_steps=parts.total_steps,  # set-up done: the steps follow
                hosts=run_tags[TAG_HOSTS].split(","), resumed_from=str(loaded.path) if loaded is not None else None,
                mlflow=mlflow)
    if meter is not None:
        _report_goodput(meter, parts, events)
        if clock is not None:
            watch = StragglerWatch(hosts, recipe.tracking.straggler_fraction, recipe.tracking.straggler_windows,
                                   lambda found: events.emit("straggler", **found))
            parts.rank_times = watch.observe
    tracking = recipe.tracking
    run_id = shared_run_id(getattr(parts.tracker, "run_id", None)) if tracking.enabled and tracking.system_metrics \
        else None  # every rank or none: a collective
    try:
        with node_metrics(tracking, hosts, rank, run_id):  # the first rank of every other host
            summary = fit(parts)
        if not summary.get("preempted"):
            log_final_weights(parts.tracker, backend.module, recipe.run_dir)
    except BaseException as exc:
        parts.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", error=exc)
        raise
    finally:
        manager.close()
        backend.close()
    if summary.get("preempted"):
        summary["signal"] = stop_watch.signal_name or "SIGTERM"
    if meter is not None:  # this attempt's last figures and how it ended (its end record follows)
        parts.tracker.log_metrics(meter.figures(), step=parts.state.step)
        how = "preempted by " + summary["signal"] if summary.get("preempted") else "finished"
        parts.tracker.set_tags(attempt_tags(meter.attempts, meter.current, state=how))
    # Every rank returns its summary (a multi-node local launch hears how the run ended from its first
    # rank); launchers print rank 0's.
    return _report({**summary, "rank": rank}, parts, manager, world, preempted=bool(summary.get("preempted")))


TAG_RESUMED_FROM_CHECKPOINT = "rtrain.resumed_from_checkpoint"
CHECKPOINT_STAGING = ".checkpoint-staging"  # under the run directory: an object store's checkpoints pass here
TAG_RESUMED_FROM_RUN = "rtrain.resumed_from_run"


def _inside(path: Any, folder: Any) -> bool:
    if "://" in str(folder):  # an object store (ObjectPath)
        return str(path).rsplit("/", 1)[0] == str(folder).rstrip("/")
    try:
        return Path(path).resolve().parent == Path(folder).resolve()
    except OSError:
        return False


def _end_rank(rank: int, run_dir: Path, tracker: Any = None, events: EventLog | None = None) -> Any:
    """HeadWatch's on_lost in a rank: nothing reaches the driver any more, so the rank ends itself; rank 0
    first closes the MLflow run as FAILED with the reason and leaves a note saying so, which the driver waits
    for (the other ranks give it a few seconds, so that a peer's broken collective does not end it first)."""
    def on_lost(reason: str) -> None:
        print(f"rtrain: rank {rank}: {reason}; this rank stops", flush=True)
        if events is not None:
            events.emit("end", reason="failed", error=reason)
        if rank == 0:
            outcome = "the MLflow run was marked FAILED" if tracker is not None else "no MLflow run was open yet"
            try:
                if tracker is not None:
                    tracker.finish("FAILED", error=reason)
            except Exception as exc:  # noqa: BLE001 - ending the rank comes first
                outcome = f"the MLflow run could not be marked FAILED ({type(exc).__name__}: {exc})"
            write_stall_note(run_dir, outcome, name=HEAD_LOST_NOTE)
        else:
            time.sleep(5)
        os._exit(1)
    return on_lost


def _report_goodput(meter: GoodputMeter, parts: FitParts, events: EventLog) -> None:
    """Rank 0: a tag per attempt (the earlier ones as their logs tell; a killed one left no end record),
    goodput and its losses to MLflow at every log window (the last one's at the end, with the end's figures)."""
    parts.tracker.set_tags(attempt_tags(meter.attempts, meter.current))

    def on_record(record: dict[str, Any]) -> None:
        if record.get("event") == "window" and record.get("step", parts.total_steps) < parts.total_steps:
            parts.tracker.log_metrics(meter.figures(), step=record["step"])
    events.observers.append(on_record)


def _suspect_recorder(guard: CrashGuard | None, loader: Any) -> Any:
    """The stall watchdog's on_stall: what a rank stuck waiting for data was reading goes into the run's
    suspects (rtrain.data.suspects); a rank stuck elsewhere is no evidence against the data."""
    manifest = getattr(loader, "manifest", None)
    if guard is None or manifest is None:
        return None
    names = [entry.name for entry in manifest.shards]

    def on_stall(stalled: list[Any]) -> None:
        for beat in stalled:
            if beat.phase == "waiting for data":
                why = f"rank {beat.rank} waited for data for over the stall timeout (dist.stall_timeout_s)"
                guard.record_stalled(beat.rank, names, loader._offsets, why)
    return on_stall


def _restore(parts: FitParts, loaded: Loaded, manager: CheckpointManager, seed: int) -> None:
    """Same world size: every state, bit-identical continuation. Another world size (elastic): shared states,
    the loader position of a peer (the loader replans the rest of the epoch: each sample still once), and
    RNG streams derived afresh from (seed, step, rank)."""
    rank, world = parts.rank, manager.world_size
    if loaded.world_size == world:
        restore(parts, loaded.shared, loaded.per_rank)
    else:
        per_rank = loaded.per_rank or manager.per_rank_states_of(loaded, rank % loaded.world_size)
        restore(parts, loaded.shared, per_rank, skip=("rng",))
        reseed_rng(seed, parts.state.step, rank)
    log.info("rank %d resumed from %s at step %d%s", rank, loaded.path, parts.state.step,
             "" if loaded.world_size == world else f" (written by {loaded.world_size} ranks, now {world})")


def _resume(recipe: Recipe, manager: CheckpointManager) -> Loaded | None:
    choice = recipe.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":  # damaged checkpoints: moved aside or refused, never trained over (checkpoint.damage)
        loaded = manager.resume(recipe.checkpoint.on_all_damaged)
    else:
        loaded = manager.load(choice)
    _same_on_every_rank(loaded)
    return loaded


def _same_on_every_rank(loaded: Loaded | None) -> None:
    """Every rank chose its checkpoint alone: a step published (or set aside) between two ranks' choices
    would have them train on from different states. One small all_gather finds it; the run stops, named."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    mine = (str(loaded.path), loaded.step, loaded.save_id) if loaded is not None else None
    every: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    if len(set(every)) > 1:
        chose = "; ".join(f"rank {rank}: {choice[0] if choice else 'none'}" for rank, choice in enumerate(every))
        raise CheckpointError(f"the ranks resumed different checkpoints ({chose[:1000]}): the checkpoint folder "
                              "changed while they chose (another writer?); rerun the same command")


def _report(summary: dict[str, Any], parts: FitParts, manager: CheckpointManager, world: int,
            preempted: bool = False) -> dict[str, Any]:
    """The summary, with where the run's last checkpoint and MLflow run are; the MLflow run closed
    (KILLED when a signal stopped it: it continues when the run is resumed)."""
    saved = manager.list()
    summary.update(checkpoint=str(saved[0]) if saved else None, run_id=getattr(parts.tracker, "run_id", None),
                   world_size=world, total_steps=parts.total_steps)
    parts.tracker.finish("KILLED" if preempted else "FINISHED")
    return summary


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    logging.basicConfig(level=os.environ.get("RTRAIN_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    recipe = loads_recipe(config["recipe_yaml"], where="recipe")
    try:
        return _train(recipe)  # under Ray Train, rank 0's return value reaches the driver as return_value
    except LoaderStall as exc:  # a stall like the watchdog's: the launchers exit EXIT_STALLED (retryable)
        write_stall_note(recipe.run_dir, " ".join(str(exc).split()))
        if os.environ.get(DEBUG_ENV):
            raise
        raise exc.with_traceback(None) from None
    except EXPECTED_ERRORS as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        raise exc.with_traceback(None) from None  # its message is enough: no stack of rtrain's frames in logs
    finally:
        shutdown_distributed()

