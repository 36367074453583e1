"""DeepSpeed (ZeRO stage 0 or 1) behind the same Backend protocol as DDP.

Precision, and why it is set up this way:

- fp32: DeepSpeed without any precision section.
- bf16: DeepSpeed's ``torch_autocast`` section with an empty ``lower_precision_safe_modules`` list. The
  weights stay fp32 (they are the master weights; BatchNorm keeps fp32 parameters and statistics), the
  forward runs under ``torch.autocast(bf16)`` and gradients are reduced in fp32 -- the same math as the DDP
  backend. Two alternatives are wrong for us: DeepSpeed's ``bf16`` mode casts the whole module, BatchNorm
  included, to bf16 (needs ``data_types.buffer_dtype`` and keeps running stats in bf16); and plain fp32
  DeepSpeed under the step's own autocast silently runs fp32, because ``engine.forward`` turns an outer
  autocast *off* unless ``torch_autocast`` is configured. The empty module list keeps DeepSpeed from tagging
  conv/linear parameters with a bf16 ``comm_dtype`` (that would reduce their gradients in bf16).
- fp16: DeepSpeed's own ``fp16`` section (``auto_cast`` casts the inputs), so DeepSpeed owns the fp32
  master weights and the loss scaler (dynamic: ``initial_scale_power``/``loss_scale_window``, backing off on
  every overflow like GradScaler; or a static ``loss_scale``), and reports overflow-skipped steps. The
  module itself runs in fp16 (BatchNorm and its running stats included, ``data_types.buffer_dtype``),
  which is DeepSpeed's fp16 math, not torch AMP's. The
  ``torch_autocast`` fp16 route was rejected: its GradScaler cannot be configured, and under ZeRO the
  gradient clipping is computed on the still-scaled gradients. DeepSpeed refuses fp16 where its
  accelerator has no fp16 kernels (e.g. CPUs without AVX512-FP16); that is reported at construction.

Non-finite gradients skip the step in every precision, as with DDP: DeepSpeed's loss scaler does it for
fp16, ZeRO's overflow check (switched on here) for ZeRO-1, and for stage 0 the gradients are dropped so
the torch optimizer leaves every parameter and its state untouched.

State: the module (for fp16 the fp16 weights; the fp32 masters are in the optimizer state) and the engine
counters are shared; a stage-0 optimizer is rank-identical and shared too; a ZeRO-1 optimizer holds this
rank's partition (optimizer state and fp32 master weights) and goes in the per-rank state. DeepSpeed's
state dicts hold a few non-tensor objects (the loss scaler, an enum, fragment mappings for universal
checkpoints); they are converted to plain types here so everything loads with ``weights_only=True``.
Files are never written here (``engine.save_checkpoint`` is not used): rtrain.checkpoint owns that.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import math
from typing import Any, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn

from rtrain._safe_state import StateWalk, dotted_entry_path
from rtrain.distributed.backend import StepOutcome, any_nonfinite, check_backend_version

STATE_VERSION = 2  # 1: the flat entries of the first checkpoint layout
PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1)
# DeepSpeed's ZeRO-1 state keys that we convert by hand or drop.
LOSS_SCALER_KEY = "loss_scaler"
SLICE_MAPPINGS_KEY = "param_slice_mappings"  # only for DeepSpeed's universal checkpoints; not needed here
SCALER_ATTR_TYPES = (bool, int, float, str, type(None))
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def deepspeed_config(*, world_size: int, precision_dtype: str = "fp32", fp16_dynamic: bool = True,
                     init_scale: float = 2.0**16, growth_interval: int = 2000, static_scale: float = 1.0,
                     zero_stage: int = 0, micro_batch_per_gpu: int = 1, accumulation_steps: int = 1,
                     clip_grad_norm: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for one run (validated here so a bad value names our argument)."""
    if precision_dtype not in PRECISIONS:
        raise ValueError(f"DeepSpeedBackend: precision_dtype must be one of {PRECISIONS}, got {precision_dtype!r}")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeedBackend: zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    for name, value in (("world_size", world_size), ("micro_batch_per_gpu", micro_batch_per_gpu),
                        ("accumulation_steps", accumulation_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"DeepSpeedBackend: {name} must be a positive int, got {value!r}")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ValueError(f"DeepSpeedBackend: clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_per_gpu,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_per_gpu * accumulation_steps * world_size,
        # elastic_checkpoint off: each rank's ZeRO state then loads from that rank's file alone.
        "zero_optimization": {"stage": zero_stage, "elastic_checkpoint": False},
        "zero_allow_untested_optimizer": True,  # our SGD/LARS are plain torch optimizers
        "gradient_clipping": float(clip_grad_norm or 0.0),
        "steps_per_print": 2**62,  # rtrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if precision_dtype == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif precision_dtype == "fp16":
        config["fp16"] = _fp16_section(fp16_dynamic, init_scale, growth_interval, static_scale)
        # DeepSpeed casts parameters, not buffers: BatchNorm's fp32 running stats would meet fp16 weights.
        config["data_types"] = {"buffer_dtype": "fp16"}
    return config


def _fp16_section(dynamic: bool, init_scale: float, growth_interval: int, static_scale: float) -> dict[str, Any]:
    if not dynamic:
        if static_scale <= 0:
            raise ValueError(f"DeepSpeedBackend: static_scale must be > 0, got {static_scale!r}")
        return {"enabled": True, "auto_cast": True, "loss_scale": float(static_scale)}
    power = math.log2(init_scale) if init_scale > 0 else float("nan")
    if not power.is_integer():
        raise ValueError(f"DeepSpeedBackend: init_scale must be a power of two for DeepSpeed's dynamic loss "
                         f"scaler (initial_scale_power), got {init_scale!r}")
    if growth_interval < 1:
        raise ValueError(f"DeepSpeedBackend: growth_interval must be >= 1, got {growth_interval!r}")
    # hysteresis 1: halve the scale on every overflow, as torch's GradScaler does.
    return {"enabled": True, "auto_cast": True, "loss_scale": 0, "initial_scale_power": int(power),
            "loss_scale_window": int(growth_interval), "hysteresis": 1, "min_loss_scale": 1}


def weights_only_safe(value: Any, where: str) -> Any:
    """A copy of a state tree with only types torch.load(weights_only=True) accepts; enums become values."""
    return _WEIGHTS_ONLY_SAFE(value, where)


def _weights_only_safe_leaf(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, enum.Enum):
        return weights_only_safe(value.value, where)
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    raise TypeError(f"DeepSpeedBackend: state entry {where} has type {type(value).__name__}, which cannot be "
                    "saved for torch.load(weights_only=True)")


# Converting, not strict: DeepSpeed's dict/list subclasses become plain ones (sets are refused).
_WEIGHTS_ONLY_SAFE = StateWalk(_weights_only_safe_leaf, exact_types=False, entry_path=dotted_entry_path)


def loss_scaler_state(scaler: Any) -> dict[str, Any] | None:
    """The plain attributes of a DeepSpeed loss scaler (cur_scale, cur_iter, last_overflow_iter, ...)."""
    if scaler is None:
        return None
    return {k: v for k, v in vars(scaler).items() if isinstance(v, SCALER_ATTR_TYPES)}


def restore_loss_scaler(scaler: Any, saved: dict[str, Any] | None) -> None:
    if scaler is None or saved is None:
        return
    for name, value in saved.items():
        setattr(scaler, name, value)


def _from_first_layout(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before the Stateful contract: the backend's entries sat flat beside the others."""
    shared, per_rank = state["shared"], state["per_rank"]
    if shared.get("version") != 1:
        raise ValueError(f"DeepSpeedBackend: checkpoint state version {shared.get('version')!r} is not 1 "
                         "(not a DeepSpeed backend checkpoint?)")
    info = {key: shared[key] for key in ("world_size", "zero_stage", "precision_dtype", "engine")}
    mine = {key: per_rank[key] for key in ("rank", "world_size", "zero_optimizer", "loss_scaler")
            if key in per_rank}
    return {"version": STATE_VERSION, "per_rank": {"zero": mine} if mine else {},
            "shared": {"model": shared["model"], "optimizer": shared["optimizer"], "deepspeed": info}}


def _check_fp16_supported(precision_dtype: str, device: torch.device) -> None:
    from deepspeed.accelerator import get_accelerator

    if precision_dtype == "fp16" and not get_accelerator().is_fp16_supported():
        raise RuntimeError(f"DeepSpeedBackend: DeepSpeed has no fp16 support on this device ({device}); use "
                           "precision.dtype=bf16 or fp32, or distributed.engine=ddp for fp16 autocast")


class DeepSpeedBackend:
    """A DeepSpeed engine (ZeRO 0/1, fp32/bf16/fp16) stepped the way rtrain's train step drives a backend."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 precision_dtype: str = "fp32", fp16_dynamic: bool = True, init_scale: float = 2.0**16,
                 growth_interval: int = 2000, static_scale: float = 1.0, zero_stage: int = 0,
                 micro_batch_per_gpu: int = 1, accumulation_steps: int = 1,
                 clip_grad_norm: float | None = None) -> None:
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError("dist.engine=deepspeed needs DeepSpeed: pip install 'rtrain[deepspeed]'") \
                from exc
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.precision_dtype = precision_dtype
        self.zero_stage = zero_stage
        config = deepspeed_config(
            world_size=self.world_size, precision_dtype=precision_dtype, fp16_dynamic=fp16_dynamic,
            init_scale=init_scale, growth_interval=growth_interval, static_scale=static_scale,
            zero_stage=zero_stage, micro_batch_per_gpu=micro_batch_per_gpu,
            accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm)
        self.device = device
        _check_fp16_supported(precision_dtype, device)
        engine, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=config,
                                               dist_init_required=False)
        self.engine = engine
        self.module: nn.Module = engine.module
        self.optimizer = optimizer  # the torch optimizer inside DeepSpeed's wrapper: lr schedules set its groups
        if zero_stage > 0 and precision_dtype != "fp16":
            # ZeRO only checks for inf/nan when a loss scaler needs it; we want the DDP behaviour everywhere.
            engine.optimizer.check_grad_overflow = True
        self._boundary = True

    # ---- the train step ----
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def micro_context(self, last: bool) -> ContextManager:
        return self._micro(last)

    @contextlib.contextmanager
    def _micro(self, last: bool) -> Iterator[None]:
        # The step, not DeepSpeed's micro-step counter, decides where the accumulation boundary is.
        self._boundary = last
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The step already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self._boundary:
            self.engine.step()  # DeepSpeed's per-micro-batch step: counts it, updates nothing

    def step(self) -> StepOutcome:
        if not self._boundary:
            raise RuntimeError("DeepSpeedBackend.step() called before the last micro-batch (micro_context(last=True))")
        engine = self.engine
        skipped_before = engine.skipped_steps
        dropped = self.zero_stage == 0 and self.precision_dtype != "fp16" and self._drop_nonfinite_grads()
        engine.step()
        if dropped:
            engine.skipped_steps += 1
        found_inf = engine.skipped_steps > skipped_before
        return StepOutcome(stepped=not found_inf, found_inf=found_inf)

    def _drop_nonfinite_grads(self) -> bool:
        """Stage 0 has all-reduced (rank-identical) grads on the params; without grads the optimizer skips them."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not any_nonfinite([p.grad for p in params]):
            return False
        for p in params:
            p.grad = None
        return True

    def loss_scale(self) -> float:
        if self.precision_dtype != "fp16":
            return 1.0
        optimizer = self.engine.optimizer  # FP16_UnfusedOptimizer (stage 0) or the ZeRO optimizer
        config = getattr(optimizer, "loss_scale_config", None)
        return float(config.cur_scale if config is not None else optimizer.cur_scale)

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        """Model, stage-0 optimizer and engine counters shared; ZeRO partitions per rank."""
        engine = self.engine
        optimizer = None
        if self.zero_stage == 0:
            optimizer = weights_only_safe(engine.optimizer.state_dict(), "optimizer")
        info = {"world_size": self.world_size, "zero_stage": self.zero_stage,
                "precision_dtype": self.precision_dtype,
                "engine": {name: int(getattr(engine, name)) for name in ENGINE_COUNTERS}}
        shared = {"model": self.module.state_dict(), "optimizer": optimizer, "deepspeed": info}
        if self.zero_stage == 0:
            return {"version": STATE_VERSION, "shared": shared, "per_rank": {}}
        zero = dict(engine.optimizer.state_dict())
        scaler = loss_scaler_state(zero.pop(LOSS_SCALER_KEY, None))
        zero.pop(SLICE_MAPPINGS_KEY, None)
        mine = {"rank": self.rank, "world_size": self.world_size,
                "zero_optimizer": weights_only_safe(zero, "zero_optimizer"), "loss_scaler": scaler}
        return {"version": STATE_VERSION, "shared": shared, "per_rank": {"zero": mine}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if check_backend_version(state, "DeepSpeedBackend", (0, STATE_VERSION)) == 0:
            state = _from_first_layout(state)
        shared, per_rank = state["shared"], state["per_rank"]
        self._check_compatible(shared["deepspeed"], per_rank.get("zero"))
        self.module.load_state_dict(shared["model"])
        if self.zero_stage == 0:
            self.engine.optimizer.load_state_dict(shared["optimizer"])
        else:
            self._load_zero(per_rank["zero"])
        for name, value in shared["deepspeed"]["engine"].items():
            setattr(self.engine, name, value)

    def _load_zero(self, mine: dict[str, Any]) -> None:
        zero_optimizer = self.engine.optimizer
        # DeepSpeed indexes the list by data-parallel rank; with elastic_checkpoint off it reads only ours.
        state_list: list[Any] = [None] * self.world_size
        state_list[dist.get_rank(group=zero_optimizer.dp_process_group)] = mine["zero_optimizer"]
        zero_optimizer.load_state_dict(state_list, load_optimizer_states=True, load_from_fp32_weights=True)
        restore_loss_scaler(zero_optimizer.loss_scaler, mine["loss_scaler"])

    def _check_compatible(self, info: dict[str, Any], mine: dict[str, Any] | None) -> None:
        for key, current in (("zero_stage", self.zero_stage), ("precision_dtype", self.precision_dtype)):
            if info[key] != current:
                raise ValueError(f"DeepSpeedBackend: checkpoint was saved with {key}={info[key]!r}, "
                                 f"this run has {key}={current!r}")
        if self.zero_stage == 0:
            return
        if info["world_size"] != self.world_size:
            raise ValueError(f"DeepSpeedBackend: the ZeRO-{self.zero_stage} checkpoint was saved with world size "
                             f"{info['world_size']} but this run has world size {self.world_size}; ZeRO "
                             "optimizer partitions resume only on the same number of ranks")
        if not mine or mine.get("rank") != self.rank:
            raise ValueError(f"DeepSpeedBackend: rank {self.rank} got the per-rank ZeRO state of rank "
                             f"{mine.get('rank') if mine else None!r}")

    def close(self) -> None:
        """Tear down in an order that cannot strand a peer; the caller still owns (and destroys) WORLD.

        1. A barrier: no rank closes sockets while a peer is still inside the last step's collectives
           (gloo raises on a vanished peer in its I/O thread, which aborts the process).
        2. ``engine.destroy()`` now, and our reference dropped, so DeepSpeedEngine.__del__ does not run during
           interpreter teardown with half the modules gone.
        3. DeepSpeed's clone of the world group (a process group held in a deepspeed module global) is
           destroyed through ``deepspeed.comm`` -- which also drops that global -- instead of living on
           until interpreter exit.
        """
        engine = self.engine
        if engine is None:
            return
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()
        ds_group = getattr(engine, "data_parallel_group", None)
        engine.destroy()
        self.engine = None
        if distributed and ds_group is not None and ds_group is not dist.GroupMember.WORLD:
            import deepspeed.comm

            deepspeed.comm.destroy_process_group(ds_group)
        del engine
        gc.collect()
