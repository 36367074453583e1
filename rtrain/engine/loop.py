"""fit(): the training loop. It is handed everything it touches (backend, loaders, schedule, checkpointer,
tracker); it imports neither checkpointing nor tracking, so the same loop runs under Ray Train, a plain
torch.distributed launch and the tests.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from rtrain._errors import ExpectedError
from rtrain.config import CheckpointConfig, EvalConfig, PrecisionConfig, TrainConfig
from rtrain.distributed.backend import Backend
from rtrain.engine import stateful
from rtrain.engine.ema import ModelEMA
from rtrain.engine.rng import RngStreams
from rtrain.engine.state import TrainState
from rtrain.engine.step import TrainStep

log = logging.getLogger("rtrain.engine")


class NonFiniteLossError(ExpectedError, RuntimeError):
    """Too many consecutive non-finite steps; the weights were never updated with them."""


class Checkpointer(Protocol):
    def save(self, step: int, shared: dict, per_rank: dict | None = None, meta: dict | None = None) -> None: ...
    def wait(self) -> None: ...


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...


class Schedule(Protocol):
    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float: ...


@dataclass
class FitParts:
    train: TrainConfig  # batch, log cadence, non-finite limit
    precision: PrecisionConfig  # whether overflow skips are by design (loss scaling)
    evaluation: EvalConfig  # eval cadence
    checkpoint: CheckpointConfig  # save cadence
    backend: Backend
    train_step: TrainStep
    train_loader: Any  # rtrain.data ShardLoader: set_epoch, __iter__, __len__, state_dict, stats
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # runs the eval split on a model
    schedule: Schedule
    total_steps: int
    steps_per_epoch: int
    checkpointer: Checkpointer | None = None
    tracker: Tracker | None = None
    ema: ModelEMA | None = None
    state: TrainState = field(default_factory=TrainState)
    rank: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in every checkpoint (e.g. the resolved recipe)
    # Called by every rank after every step; True (the same on all ranks) stops the run after a checkpoint.
    should_stop: Callable[[], bool] | None = None
    # Called by every rank after each completed epoch (after its eval) and once at the end, with the model
    # and TrainState: analyses such as layer responses (the composition root decides what runs and where).
    after_epoch: Callable[[torch.nn.Module, TrainState, bool], None] | None = None
    # Told at every change of what this rank does ("waiting for data", "in the step", "saving", "evaluating")
    # with the step: the stall watchdog's heartbeat (rtrain.distributed.watchdog).
    progress: Callable[[str, int], None] | None = None
    # This rank's structured log (rtrain.tracking.events): `events(name, **fields)` for every log window
    # (with the seconds this rank waited for data), eval, checkpoint and stop.
    events: Callable[..., None] | None = None
    # This rank's seconds blocked in collectives so far (rtrain.distributed.waits.CollectiveClock). With it,
    # every log window gathers each rank's data wait, step and collective seconds in the one all_gather that
    # also averages the loss (in place of the loss's all_reduce), and `rank_times(step, table)` is told the
    # table: one dict per rank (rank, steps, data_wait_s, step_s, collective_s); what it returns is logged
    # with the window's metrics.
    collective_s: Callable[[], float] | None = None
    rank_times: Callable[[int, list[dict[str, float]]], dict[str, float]] | None = None


def stateful_parts(parts: FitParts) -> list[stateful.Part]:
    """Everything a checkpoint holds, by name: what is saved is exactly what is restored."""
    named = [stateful.Part("backend", parts.backend, "split"),
             stateful.Part("train_state", parts.state, "shared"),
             stateful.Part("rng", RngStreams(), "per_rank"),
             stateful.Part("loader", parts.train_loader, "per_rank")]
    if parts.ema is not None:
        named.append(stateful.Part("ema", parts.ema, "shared", optional=True))
    return named


def checkpoint_payload(parts: FitParts) -> tuple[dict, dict, dict]:
    shared, per_rank = stateful.collect(stateful_parts(parts))
    meta = {**parts.meta, "step": parts.state.step, "epoch": parts.state.epoch,
            "samples_seen": parts.state.samples_seen}
    if parts.tracker is not None:
        meta["tracking"] = parts.tracker.state_dict()
    return shared, per_rank, meta


def restore(parts: FitParts, shared: dict, per_rank: dict, skip: tuple[str, ...] = ()) -> None:
    stateful.restore(stateful_parts(parts), shared, per_rank, skip)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _global_mean(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def gather_rows(mine: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d tensor, stacked in rank order (one all_gather; called by every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return mine.view(1, -1)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return torch.stack(every)


class _Fit:
    def __init__(self, parts: FitParts) -> None:
        self.p = parts
        self.last_eval: dict[str, float] = {}
        self.last_loss = math.nan
        self.images_per_s = 0.0
        self.window_hits: torch.Tensor | None = None  # train top-1/top-5 hits since the last logged step
        self.window_data_s = 0.0  # what this rank waited for its loader since the last logged step
        self.window_step_s = 0.0  # ... and spent in its steps (forward, backward, optimizer, EMA)
        self.window_steps = 0
        self.tick: float | None = None  # when the window began (a window may span an epoch's end)
        self.window_eval_s = 0.0  # an epoch's eval inside the window: not the steps' time
        self.collective_mark = parts.collective_s() if parts.collective_s is not None else 0.0
        # A restored run already has its checkpoint at this step.
        self.last_saved_step = parts.state.step if parts.state.step > 0 else -1
        self.stopped = False

    def run(self) -> dict[str, Any]:
        p, state = self.p, self.p.state
        loader_epoch = p.train_loader.state_dict().get("epoch")
        if loader_epoch != state.epoch or state.step == 0:
            p.train_loader.set_epoch(state.epoch)
        while state.step < p.total_steps and not self.stopped:
            finished_epoch = self._run_epoch()
            if not finished_epoch:
                break
            state.epoch += 1
            if self._eval_due(state.epoch) and not self.stopped:  # a stop has a grace period: no eval
                self._evaluate()
            if p.after_epoch is not None and not self.stopped:
                p.after_epoch(self._eval_model(), state, False)
            if p.checkpoint.every_steps is None:
                self._save()
            p.train_loader.set_epoch(state.epoch)
        if self.stopped:
            return self._stop()
        if not self.last_eval or self.last_eval.get("step") != state.step:
            self._evaluate()
        if p.after_epoch is not None:
            p.after_epoch(self._eval_model(), state, True)
        self._save(final=True)
        if p.checkpointer is not None:
            p.checkpointer.wait()
        return self._summary()

    def _run_epoch(self) -> bool:
        """Train through the loader's epoch; True when the epoch was completed."""
        p, state = self.p, self.p.state
        every = p.checkpoint.every_steps
        waiting = time.perf_counter()
        if self.tick is None:
            self.tick = waiting
        self._progress("waiting for data")
        for images, labels in p.train_loader:
            began = time.perf_counter()
            self.window_data_s += began - waiting
            self._progress("in the step")
            lr = p.schedule.apply(p.backend.optimizer, state.step)
            result = p.train_step(images, labels)
            state.step += 1
            state.samples_seen += p.train.global_batch
            self._check_finite(result.found_inf)
            if result.hits is not None:
                self.window_hits = result.hits if self.window_hits is None else self.window_hits + result.hits
            if p.ema is not None and result.stepped:
                p.ema.update(p.backend.module)
            self.window_step_s += time.perf_counter() - began
            self.window_steps += 1
            if state.step % p.train.log_every_steps == 0 or state.step == p.total_steps:
                self._log_step(result.loss, lr, time.perf_counter() - self.tick - self.window_eval_s)
                self.tick, self.window_eval_s = time.perf_counter(), 0.0
            if every is not None and state.step % every == 0:
                self._save()
            if state.step >= p.total_steps:
                # Every epoch is exactly steps_per_epoch steps (equal batches on every rank).
                return state.step % p.steps_per_epoch == 0
            if p.should_stop is not None and p.should_stop():
                self.stopped = True
                return state.step % p.steps_per_epoch == 0
            self._progress("waiting for data")
            waiting = time.perf_counter()
        return True

    def _progress(self, phase: str) -> None:
        if self.p.progress is not None:
            self.p.progress(phase, self.p.state.step)

    def _stop(self) -> dict[str, Any]:
        """Every rank agreed to stop after this step: checkpoint it, synchronously, and report."""
        self._event("stop", step=self.p.state.step)
        self._save()
        if self.p.checkpointer is not None:
            self.p.checkpointer.wait()
        return {**self._summary(), "preempted": True}

    def _check_finite(self, found_inf: bool) -> None:
        state = self.p.state
        if not found_inf:
            state.nonfinite_streak = 0
            return
        state.skipped_steps += 1
        if self.p.precision.scaler != "none":
            return  # loss scaling: an overflow lowers the scale and the step is skipped, by design
        state.nonfinite_streak += 1
        limit = self.p.train.max_nonfinite_steps
        if state.nonfinite_streak >= limit:
            raise NonFiniteLossError(
                f"{state.nonfinite_streak} consecutive non-finite losses/gradients up to step {state.step} "
                f"(train.max_nonfinite_steps={limit}); those steps were skipped, so the weights and the last "
                f"saved checkpoint are intact. Lower optim.lr or check the data.")

    def _log_step(self, loss: torch.Tensor, lr: float, seconds: float) -> None:
        p = self.p
        steps = max(1, self.window_steps)
        collective_s, timing = self._window_ranks(loss, steps)
        self.images_per_s = steps * p.train.global_batch / max(seconds, 1e-9)
        stats = getattr(p.train_loader, "stats", {}) or {}
        metrics = {"train/loss": self.last_loss, "train/lr": lr, "train/images_per_s": self.images_per_s,
                   "train/loss_scale": p.backend.loss_scale(), "train/epoch": p.state.epoch,
                   "train/skipped_steps": p.state.skipped_steps,
                   "train/skipped_samples": float(stats.get("skipped_samples", 0)), **self._train_errors(), **timing}
        if p.tracker is not None:
            p.tracker.log_metrics(metrics, step=p.state.step)
        self._event("window", step=p.state.step, steps=steps, seconds=seconds, data_wait_s=self.window_data_s,
                    step_s=self.window_step_s, collective_s=collective_s, loss=self.last_loss,
                    images_per_s=self.images_per_s)
        self.window_data_s = self.window_step_s = 0.0
        self.window_steps = 0
        if p.rank == 0:
            eta_s = (p.total_steps - p.state.step) * seconds / steps
            epochs = math.ceil(p.total_steps / p.steps_per_epoch)
            log.info("step %d/%d (%d%%) epoch %d/%d loss %.4f lr %.4g %.1f img/s ETA %s", p.state.step,
                     p.total_steps, 100 * p.state.step // p.total_steps, p.state.epoch + 1, epochs,
                     self.last_loss, lr, self.images_per_s, _clock(eta_s))

    def _window_ranks(self, loss: torch.Tensor, steps: int) -> tuple[float | None, dict[str, float]]:
        """Sets the loss averaged over ranks; with a collective clock, through one all_gather that also hands
        every rank's timing of this window to `rank_times`. Returns this rank's collective seconds (None without
        a clock) and rank_times' metrics."""
        p = self.p
        if p.collective_s is None:
            self.last_loss = _global_mean(loss)
            return None, {}
        clock = p.collective_s()
        collective_s, self.collective_mark = clock - self.collective_mark, clock
        mine = torch.tensor([float(loss), self.window_data_s, self.window_step_s, collective_s], dtype=torch.float64,
                            device=loss.device)
        table = gather_rows(mine)
        self.last_loss = float(table[:, 0].mean())
        if p.rank_times is None:
            return collective_s, {}
        rows = [{"rank": rank, "steps": steps, "data_wait_s": row[1], "step_s": row[2], "collective_s": row[3]}
                for rank, row in enumerate(table.tolist())]
        return collective_s, p.rank_times(p.state.step, rows)

    def _train_errors(self) -> dict[str, float]:
        """Top-1/top-5 error over every rank's batches since the last logged step."""
        hits, self.window_hits = self.window_hits, None
        if hits is None:
            return {}
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(hits)
        top1, top5, count = hits.tolist()
        return {"train/top1_error": 1.0 - top1 / count, "train/top5_error": 1.0 - top5 / count} if count else {}

    def _eval_model(self) -> torch.nn.Module:
        return self.p.ema.module if self.p.ema is not None else self.p.backend.module

    def _eval_due(self, epochs_done: int) -> bool:
        every = max(1, round(self.p.evaluation.every_epochs))
        return epochs_done % every == 0

    def _evaluate(self) -> None:
        p = self.p
        self._progress("evaluating")
        started = time.perf_counter()
        result = p.evaluate(self._eval_model())
        seconds = time.perf_counter() - started
        self.window_eval_s += seconds
        self._event("eval", step=p.state.step, seconds=seconds, top1=result["top1"])
        p.state.last_top1 = result["top1"]
        p.state.best_top1 = max(p.state.best_top1, result["top1"])
        self.last_eval = {**result, "step": p.state.step}
        if p.tracker is not None:
            p.tracker.log_metrics({f"val/{k}": v for k, v in result.items()}, step=p.state.step)
        if p.rank == 0:
            log.info("eval step %d: top1 %.4f top5 %.4f loss %.4f (%d samples)", p.state.step,
                     result["top1"], result["top5"], result["loss"], result["samples"])

    def _save(self, final: bool = False) -> None:
        p = self.p
        if p.checkpointer is None or p.state.step == self.last_saved_step:
            return
        self.last_saved_step = p.state.step
        self._progress("saving a checkpoint")
        shared, per_rank, meta = checkpoint_payload(p)
        meta["final"] = final
        p.checkpointer.save(p.state.step, shared, per_rank, meta)
        self._progress("saved a checkpoint")
        # what the save cost the step loop; an object store's last upload
        metrics = {"checkpoint/blocked_s": float(getattr(p.checkpointer, "last_save_blocking_s", 0.0))}
        upload = getattr(p.checkpointer, "last_upload", None) or {}
        metrics.update({f"checkpoint/upload_{key}": float(value) for key, value in upload.items()
                        if key in ("seconds", "bytes")})
        if p.tracker is not None:
            p.tracker.log_metrics(metrics, step=p.state.step)
        self._event("checkpoint", step=p.state.step, final=final,
                    **{key.split("/", 1)[1]: value for key, value in metrics.items()})

    def _event(self, name: str, **fields: Any) -> None:
        if self.p.events is not None:
            self.p.events(name, **fields)

    def _summary(self) -> dict[str, Any]:
        s = self.p.state
        skipped, by_shard = _skips_over_ranks(self.p.train_loader)
        return {"step": s.step, "epoch": s.epoch, "samples_seen": s.samples_seen, "train_loss": self.last_loss,
                "val_top1": self.last_eval.get("top1"), "val_top5": self.last_eval.get("top5"),
                "best_top1": s.best_top1, "skipped_steps": s.skipped_steps,
                "skipped_samples": skipped, "skipped_by_shard": by_shard, "images_per_s": self.images_per_s}


def _skips_over_ranks(loader: Any) -> tuple[int, dict[str, int]]:
    """Samples the train loader skipped (bad data, `data.on_bad_sample: skip`), in all and per shard, summed
    over every rank: each rank reads other shards. Called by every rank (a collective)."""
    stats = getattr(loader, "stats", {}) or {}
    mine = (int(stats.get("skipped_samples", 0)), dict(getattr(loader, "skipped_by_shard", {}) or {}))
    every: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    by_shard: dict[str, int] = {}
    for _, shards in every:
        for name, count in shards.items():
            by_shard[name] = by_shard.get(name, 0) + count
    return sum(count for count, _ in every), dict(sorted(by_shard.items()))


def fit(parts: FitParts) -> dict[str, Any]:
    """Train until parts.total_steps; evaluate per parts.evaluation and at the end; checkpoint per
    parts.checkpoint."""
    return _Fit(parts).run()
