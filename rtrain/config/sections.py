"""Recipe sections. The schema is the documentation: every field is typed, defaulted and described.

Sections are frozen: a validated recipe is never mutated; overrides produce a new recipe.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_BASE_LR_PER_256 = 0.1
RELATIVE = (" A relative path is relative to the folder the launch starts in (the resolved recipe records it "
            "absolute).")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _not_a_url(value: str | None) -> str | None:
    """Run outputs go to a filesystem path (which every node mounts, for more than one node); a URL (s3://,
    even file://) would silently become a local folder named 's3:' or 'file:'."""
    if value and "://" in value:
        raise ValueError("an object-store or other URL is not supported for run outputs yet: give a folder; "
                         "checkpoints may go to a bucket (checkpoint.dir=s3://bucket/prefix), shards may come "
                         "from one (data.source), cached on each node with data.cache_dir")
    return value


class RunConfig(Section):
    name: str = Field("rtrain", min_length=1, description="Run name: the MLflow run name and the folder under "
                      "run.output_root that holds the run's outputs; a plain name (no '/', not '.' or '..').")
    seed: int = Field(0, ge=0, description="Seed of every RNG stream (model init, shuffling, augmentation).")
    output_root: str = Field("runs", description="Folder under which run outputs (checkpoints, summaries) go."
                             + RELATIVE)

    @field_validator("output_root")
    @classmethod
    def _a_folder(cls, root: str) -> str:
        return _not_a_url(root)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The run directory is output_root/name: a path here would put it (and its checkpoints) elsewhere.
        if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise ValueError("not a plain name: it names the run's folder under run.output_root, so no '/' "
                             "and not '.' or '..' (put parent folders in run.output_root)")
        return name


class ModelConfig(Section):
    name: str = Field("resnet50", description="Registered model name (`rtrain models` lists them).")
    shortcut: Literal["A", "B", "C"] | None = Field(
        None, description="Shortcut option of the paper: A zero-pad, B projection where dims grow, C all "
        "projections. None = the family default (B for ImageNet, A for CIFAR).")
    stride_in: Literal["1x1", "3x3"] = Field(
        "3x3", description="Where a bottleneck's stride 2 sits: 1x1 = paper v1, 3x3 = v1.5 (torchvision, MLPerf).")
    zero_init_residual: bool = Field(False, description="Init the last BN gamma of each residual block to 0.")
    num_classes: int | None = Field(None, gt=0, description="Output classes; None = from the data manifest.")
    depth: int | None = Field(None, gt=0, description="Depth 6n+2 for the generic cifar_resnet/cifar_plain.")
    checkpoint_stages: bool | list[int] = Field(
        False, description="Activation checkpointing: true for all stages or a list of stage indices (1-based).")
    init_from: str | None = Field(
        None, description="Optional torchvision-format state dict (.pt/.pth) to initialise the weights from. "
        "Strict: every tensor of the file must match the model by name and shape, and every tensor of the model "
        "must be in the file, except under model.init_from_skip.")
    init_from_skip: list[str] = Field(
        [], description="Parameter-name prefixes left freshly initialised by model.init_from, e.g. [fc] to "
        "fine-tune onto another number of classes.")


class DataConfig(Section):
    source: str = Field("data/digits-shards", description="Shard root (local path, http(s):// URL prefix, or an "
                        "fsspec URL such as s3://bucket/prefix) holding <split>/manifest.json (the shards are "
                        "beside it unless the manifest names a shard_root)." + RELATIVE)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for s3:// and other fsspec sources, passed as is "
        "(e.g. {endpoint_url: http://minio:9000} or {anon: true}). Credentials and the endpoint normally come from "
        "the standard AWS_* environment variables; keep secrets out of recipes (the recipe is logged to MLflow).")
    allowed_shard_roots: list[str] = Field(
        default_factory=list, description="Locations outside data.source that a manifest's shard_root may point "
        "to (paths or URL prefixes). A manifest is data, not directions: by default its shards must lie under "
        "data.source.")
    train_split: str = Field("train", description="Split folder used for training.")
    val_split: str = Field("val", description="Split folder used for evaluation.")
    num_workers: int = Field(2, ge=0, description="Loader worker processes per rank (0 = in-process).")
    shuffle_buffer: int = Field(2000, ge=1, description="Sample-level shuffle buffer size (train).")
    image_size: int = Field(224, ge=8, description="Train/eval crop size.")
    eval_resize: int = Field(256, ge=8, description="Eval: shorter side resized to this before the center crop.")
    augment: Literal["rrc", "scale", "cifar", "none"] = Field(
        "rrc", description="Train augmentation: rrc = RandomResizedCrop+flip; scale = paper's shorter side in "
        "[scale_min, scale_max] + random crop + flip; cifar = pad 4 + crop + flip; none = the eval transform.")
    rrc_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range.")
    rrc_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range.")
    scale_min: int = Field(256, ge=8, description="Scale augmentation: smallest shorter side.")
    scale_max: int = Field(480, ge=8, description="Scale augmentation: largest shorter side.")
    pca_lighting: float = Field(0.0, ge=0, description="AlexNet PCA lighting alphastd (0 = off, 0.1 classic).")
    eval_transform: Literal["resize_center", "cifar"] = Field(
        "resize_center", description="Eval transform: resize + center crop, or the image as is (CIFAR).")
    channels_last: bool = Field(
        False, description="Model and its normalized input in channels_last memory format (the loader's uint8 "
                           "batches are channels_last memory always; the device converts).")
    on_bad_sample: Literal["skip", "raise"] = Field(
        "skip", description="A sample that fails to decode or a bad shard: skip and count it, or raise.")
    loader_timeout_s: float = Field(
        300.0, ge=0, description="A rank whose loader worker processes deliver no batch for this long fails with "
        "a LoaderStall naming it and the shard or sample the awaited worker was on, instead of waiting (0 = wait "
        "forever; in-process loading has no timeout). Retryable (exit 76); what stalls a rank in two attempts "
        "is quarantined for the run (suspects.jsonl in the run directory).")
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="The most pixels (width x height, from the image's header) a sample may "
        "have; a larger one is a bad sample (data.on_bad_sample), refused before any decoder allocates for it. "
        "The default is Pillow's MAX_IMAGE_PIXELS; Pillow refuses twice that in its (non-JPEG) path whatever "
        "this says.")
    verify_sha256: bool = Field(False, description="Check each shard's sha256 against the manifest on read.")
    cache_dir: str | None = Field(
        None, description="A folder on each node where remote shards (s3://, http(s)://) are kept after their "
        "first read: fetched once per node, verified against the manifest's sha256 when written and when used, "
        "shared by the node's ranks (one download per shard at a time); None = read from the store every epoch.")
    cache_max_gb: float = Field(
        100.0, gt=0, description="Size bound of data.cache_dir: past it the least recently used shards go.")
    backend: Literal["webdataset", "dali"] = Field(
        "webdataset", description="webdataset = rtrain's CPU loader; dali = NVIDIA DALI GPU decoding (CUDA only).")
    pin_memory: bool = Field(True, description="On CUDA: pinned host memory and non-blocking copies.")
    sample_ledger: bool = Field(
        False, description="Append the sample ids of every training batch to <run dir>/ledger/rank-R.jsonl, "
        "to audit that a restarted run trained on every sample exactly once.")
    mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="Per-channel mean (0..1 scale), subtracted on the device.")
    std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225), description="Per-channel std (0..1 scale), divided on the device.")


def dali_problems(data: DataConfig) -> list[str]:
    """Options of data.* that the DALI pipeline cannot honour, each naming its dotted key."""
    problems = []
    if "://" in data.source and not data.source.startswith("file://"):
        problems.append(f"data.source: DALI reads local files, not URLs ({data.source})")
    if data.augment not in ("rrc", "none"):
        problems.append(f"data.augment: {data.augment!r} is not available on DALI (use rrc or none)")
    if data.pca_lighting:
        problems.append("data.pca_lighting: PCA lighting is not available on DALI (set 0)")
    if data.eval_transform != "resize_center":
        problems.append(f"data.eval_transform: {data.eval_transform!r} is not available on DALI")
    if data.on_bad_sample != "raise":
        problems.append("data.on_bad_sample: DALI cannot skip bad samples; set raise")
    if data.verify_sha256:
        problems.append("data.verify_sha256: not available on DALI; verify shards with data_prep instead")
    if data.sample_ledger:
        problems.append("data.sample_ledger: not available on DALI")
    return problems


class TrainConfig(Section):
    global_batch: int = Field(256, gt=0, description="Samples per optimizer step over all workers.")
    accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    epochs: float = Field(90.0, gt=0, description="Training length in epochs.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the global grad norm to this (None = off).")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of weights with this decay (None = off).")
    compile: bool = Field(False, description="torch.compile the model.")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="Stop after this many consecutive non-finite losses (fp16 overflow skips excluded).")
    log_every_steps: int = Field(10, ge=1, description="Per-step metrics every this many steps.")


class OptimConfig(Section):
    name: Literal["sgd", "lars", "lamb", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate. Give this or base_lr_per_256, not both.")
    base_lr_per_256: float | None = Field(
        None, gt=0, description="Linear scaling rule: peak lr = this x global_batch / 256. Give this or lr, not "
        f"both; with neither, {DEFAULT_BASE_LR_PER_256}.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (SGD, LARS).")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    exclude_bn_bias: bool = Field(True, description="No weight decay (and no LARS adaptation) on BN and biases.")
    eta: float = Field(0.001, gt=0, description="LARS trust coefficient.")
    eps: float = Field(0.0, ge=0, description="LARS epsilon in the trust-ratio denominator.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam-style betas (LAMB, AdamW).")
    impl: Literal["torch", "apex", "deepspeed"] = Field(
        "torch", description="Kernel provider; apex/deepspeed must be installed (checked at start).")
    fused: bool | None = Field(None, description="torch fused kernels (SGD/AdamW); None = foreach.")

    @model_validator(mode="before")
    @classmethod
    def _one_learning_rate(cls, data: Any) -> Any:
        """The peak lr is given one way: optim.lr, or optim.base_lr_per_256 (the default when neither is)."""
        if not isinstance(data, dict):
            return data
        lr, base = data.get("lr"), data.get("base_lr_per_256")
        if lr is not None and base is not None:
            raise ValueError(f"optim.lr={lr!r} and optim.base_lr_per_256={base!r}: give one of them, not both")
        if lr is None and base is None:
            if "base_lr_per_256" in data:  # set to null on purpose, and no lr either
                raise ValueError("optim.lr: no learning rate; give optim.lr or optim.base_lr_per_256")
            data = {**data, "base_lr_per_256": DEFAULT_BASE_LR_PER_256}
        return data

    def peak_lr(self, global_batch: int) -> float:
        """optim.lr, or the linear scaling rule applied to base_lr_per_256."""
        if self.lr is not None:
            return self.lr
        return self.base_lr_per_256 * global_batch / 256


class ScheduleConfig(Section):
    kind: Literal["step", "cosine", "poly", "constant"] = Field("step", description="Decay after warmup.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warmup length in epochs (Goyal et al.).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in steps; overrides warmup_epochs.")
    warmup_start_lr: float = Field(0.0, ge=0, description="Learning rate at step 0 of the warmup.")
    warmup_shape: Literal["linear", "constant"] = Field(
        "linear", description="linear = from warmup_start_lr up to the peak lr (Goyal et al.); constant = "
        "warmup_start_lr throughout the warmup, then the peak lr (the paper's ResNet-110 warm start at 0.01).")
    milestones_epochs: list[float] = Field(
        default_factory=list, description="Step decay: epochs at which lr is multiplied by gamma.")
    milestones_steps: list[int] | None = Field(
        None, description="Step decay milestones in steps; overrides milestones_epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="Step decay factor (the paper's divide by 10).")
    end_lr: float = Field(0.0, ge=0, description="Final lr of cosine / poly decay.")
    power: float = Field(2.0, gt=0, description="Polynomial decay power (MLPerf: 2).")


class PrecisionConfig(Section):
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype of the forward pass.")
    scaler: Literal["dynamic", "static", "none"] = Field(
        "none", description="Loss scaling: dynamic (fp16), static (fixed static_scale) or none.")
    init_scale: float = Field(65536.0, gt=0, description="Initial dynamic loss scale.")
    growth_interval: int = Field(2000, ge=1, description="Steps without overflow before the scale doubles.")
    static_scale: float = Field(128.0, gt=0, description="Loss scale when scaler is static.")


class DistConfig(Section):
    num_workers: int = Field(1, ge=1, description="Training processes (Ray Train workers / ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; false = CPU, gloo.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs Ray reserves per worker.")
    engine: Literal["ddp", "deepspeed"] = Field("ddp", description="Data-parallel engine.")
    zero_stage: Literal[0, 1] = Field(0, description="DeepSpeed ZeRO stage (engine: deepspeed).")
    syncbn: Literal["off", "rtrain", "torch", "apex"] = Field(
        "off", description="Synchronized BN: rtrain (gloo and NCCL), torch/apex (CUDA only) or off.")
    bn_group_size: int | None = Field(None, ge=1, description="Ranks per BN group (MLPerf); None = all ranks.")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size.")
    static_graph: bool = Field(False, description="DDP static_graph.")
    ray_address: str | None = Field(None, description="Ray cluster address; None = local Ray or RAY_ADDRESS.")
    stall_timeout_s: float = Field(
        600.0, ge=0, description="A rank that makes no progress (no step, batch, save or eval phase change) for "
        "this long ends the run on every rank with one line naming it and what it was doing; exit 76, "
        "retryable (0 = off). Collectives time out this + 60 s after a peer stops answering.")
    ray_head_timeout_s: float = Field(
        20.0, ge=0, description="Ray: when the cluster's head (its GCS) answers no connection for this long, "
        "the driver and every worker stop with one line, the MLflow run is marked FAILED, exit 1; rerun to "
        "resume from the newest verified checkpoint (0 = off: Ray's own 60 s abort).")
    max_failures: int = Field(
        0, ge=-1, description="Ray: restart the worker group this many times after a failure, resuming from the "
        "newest verified checkpoint (-1 = without limit).")
    launcher: Literal["ray", "local"] = Field(
        "ray", description="ray = Ray Train workers; local = plain torch.distributed processes on this host.")

    @property
    def collective_timeout_s(self) -> float:
        """How long a collective waits for a peer: past the stall watchdog's timeout, so the watchdog's line
        names the stalled rank first (torch's default of 30 minutes when the watchdog is off)."""
        return self.stall_timeout_s + 60.0 if self.stall_timeout_s > 0 else 1800.0


# The recipe keys that make a checkpoint this run's: the model's parameters, the optimizer's state layout,
# the data and its order. A resume whose recipe differs in one of them is refused (checkpoint.allow_changes).
IDENTITY_KEYS = ("model.name", "model.shortcut", "model.stride_in", "model.num_classes", "model.depth",
                 "optim.name", "optim.impl", "dist.engine", "dist.zero_stage", "data.source", "data.train_split",
                 "train.global_batch", "run.seed")


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="Checkpoint root: a folder, or an object-store URL (s3://bucket/"
                            "prefix; credentials from the standard environment); None = <output_root>/<name>/"
                            "checkpoints." + RELATIVE)
    every_steps: int | None = Field(None, ge=1, description="Save every this many steps (None = per epoch).")
    keep: int = Field(3, ge=1, description="Keep this many newest complete checkpoints.")
    async_save: bool = Field(False, description="Snapshot to memory, write in a background thread.")
    upload_retry_s: float = Field(
        300.0, ge=0, description="checkpoint.dir in an object store: how long an upload that fails is retried "
        "(with backoff) before that checkpoint is given up (training goes on, one warning; the run's last "
        "checkpoint must publish or the run fails).")
    resume: str = Field("auto", description="auto = newest verified checkpoint if any; never; or a step-N path.")

    @field_validator("dir")
    @classmethod
    def _a_folder_or_a_bucket(cls, folder: str | None) -> str | None:
        if folder and "://" in folder and not folder.split("://", 1)[1].strip("/"):
            raise ValueError("an object-store URL needs a bucket (and a prefix), e.g. s3://bucket/run/checkpoints")
        return folder
    on_all_damaged: Literal["refuse", "restart"] = Field(
        "refuse", description="resume: auto when checkpoints exist but none verifies: refuse = do not start "
        "(exit 1, naming each damaged checkpoint; nothing is touched); restart = move them to "
        "<checkpoint dir>/damaged/ (never deleted) and train from step 0.")
    preempt_grace_s: float = Field(
        60.0, gt=0, description="After SIGTERM/SIGUSR1/SIGINT: how long the launcher waits for every rank to "
        "stop at the next step and write its checkpoint before it kills them.")
    allow_changes: list[str] = Field(
        [], description="Run-identity keys (" + ", ".join(IDENTITY_KEYS) + ") that may differ from the checkpoint "
        "being resumed: a deliberate change. Any other difference is refused before anything is loaded or written.")

    @field_validator("allow_changes")
    @classmethod
    def _identity_keys_only(cls, keys: list[str]) -> list[str]:
        unknown = [key for key in keys if key not in IDENTITY_KEYS]
        if unknown:
            raise ValueError(f"not run-identity keys: {unknown}; they are {list(IDENTITY_KEYS)} (other keys, "
                             "e.g. optim.lr, may change on resume without asking)")
        return keys


LOG_CHECKPOINTS_FROM_BOOL = {False: "none", True: "upload"}  # the field's former yes/no meaning


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log params, metrics and checkpoints to MLflow (rank 0 only).")
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI: a server URL, a database URL or "
                     "sqlite:///FILE (sqlite:///mlflow.db is mlflow.db in the folder the launch starts in; "
                     "sqlite:////abs/path is absolute).")
    experiment: str = Field("rtrain", description="MLflow experiment name.")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Preflight: how long the tracking server (or database) has to answer before "
        "the launch is refused.")
    log_checkpoints: Literal["none", "uri", "upload"] = Field(
        "uri", description="Each checkpoint on the MLflow run: none; uri = a `rtrain.checkpoint.step-N` tag with "
        "its location (nothing copied: multi-GB checkpoints stay where they are); upload = its files as artifacts "
        "under checkpoints/step-N (through the server). false/true mean none/upload.")
    system_metrics: bool = Field(
        False, description="MLflow system metrics (CPU, memory, disk, network; GPU when present) as system/*.")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between system metric samples.")
    rank_timing: bool = Field(
        True, description="Every log window, gather each rank's data wait, step and collective-wait seconds (one "
        "all_gather of 4 numbers per rank, which also averages the loss) for step_time/p50, /max, /slowest_rank "
        "and the straggler warning; false = the loss's all_reduce alone.")
    straggler_fraction: float = Field(
        0.3, gt=0, description="A rank whose own seconds per step (data wait + compute, without its wait for the "
        "others) are more than this fraction above the other ranks' median is slow in that window.")
    straggler_windows: int = Field(
        3, ge=1, description="Log windows in a row a rank must be slow before a warning names it, its host and "
        "what dominated (data wait, compute or collective wait).")
    http_timeout_s: int = Field(
        10, ge=1, description="Seconds one HTTP request to a tracking server may take "
        "(MLFLOW_HTTP_REQUEST_TIMEOUT; MLflow's own default is 120).")
    http_max_retries: int = Field(
        2, ge=0, le=10, description="Retries of a failed HTTP request (MLFLOW_HTTP_REQUEST_MAX_RETRIES; MLflow's "
        "default is 7, which can hold a step for many minutes when the server is gone).")
    http_backoff_factor: int = Field(
        1, ge=0, le=120, description="Backoff between those retries: factor x 2^retry seconds "
        "(MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR).")
    reconnect_every_s: float = Field(
        60.0, gt=0, description="While the server is unreachable, training goes on and records wait in "
        "<run dir>/tracking/unsent.jsonl; the tracker tries to send them at most this often, at the end and on resume.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra MLflow run tags.")

    @model_validator(mode="before")
    @classmethod
    def _log_checkpoints_bool(cls, data: Any) -> Any:
        """Recipes written when log_checkpoints was a yes/no switch keep working."""
        if isinstance(data, dict) and isinstance(data.get("log_checkpoints"), bool):
            data = {**data, "log_checkpoints": LOG_CHECKPOINTS_FROM_BOOL[data["log_checkpoints"]]}
        return data


class LayerResponsesConfig(Section):
    every_epochs: int = Field(1, ge=1, description="Measure after every this many epochs (and at the end).")
    batch_size: int = Field(64, ge=2, description="Images of the fixed eval batch (the first of the val split).")


class AnalysisConfig(Section):
    layer_responses: LayerResponsesConfig | None = Field(
        None, description="Paper Fig. 7: std of each residual function's output (after its last BN, before the "
        "addition) on a fixed eval batch, logged per block as layer_response/block_NNN with a PNG; None = off.")


class EvalConfig(Section):
    every_epochs: float = Field(1.0, gt=0, description="Evaluate every this many epochs (and at the end).")
    batch_size: int | None = Field(None, gt=0, description="Per-rank eval batch; None = train per-rank batch.")
    ten_crop: bool = Field(False, description="Paper's 10-crop testing.")
    scales: list[int] = Field(
        default_factory=list, description="Fully-convolutional multi-scale testing: shorter sides to average. "
        "During training these scales score the center data.eval_resize square of each image (with the CIFAR eval "
        "transform: the whole image squeezed to that square), not the whole image; `rtrain eval RUN --mode "
        "multi_scale` scores whole images.")
