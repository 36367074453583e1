"""`data.backend: dali`: the same shards through NVIDIA DALI's webdataset reader with GPU (nvJPEG) decoding.

For CUDA nodes whose CPUs cannot keep up with the GPUs. It implements the recipe options DALI can do
faithfully and refuses the rest with a message naming the key (never a silent change of the math):
- `data.source` must be a local or shared-filesystem path (DALI reads files, not URLs);
- `data.augment` rrc or none, `data.pca_lighting` 0, `data.eval_transform` resize_center;
- `data.on_bad_sample: raise` (DALI stops on an undecodable sample; it cannot skip and count) and
  `data.verify_sha256: false`;
- the pixel budget (data.max_image_pixels): DALI decodes with no per-sample check in front of it, so the split's
  manifest must say data_prep read every header against a budget within it (`checked_pixels`).
Every rank yields the same number of batches (train: floor(samples / global batch); eval: DALI's padded last
batch with the padding dropped). Position: DALI's own checkpoints (strings) are stored in the state dict;
the sample order is DALI's, not plan.py's, so resuming across a world-size change is not supported.
Cannot run on this repository's CPU machines; `check_dali_recipe` is tested there.
"""

from __future__ import annotations

from typing import Any

import torch

from rtrain.config import dali_problems
from rtrain.data.format import MANIFEST_NAME, Manifest, resolve_shard_root

DALI_STATE_VERSION = 1


def check_dali_recipe(cfg: Any) -> list[str]:
    """Problems that make the recipe impossible on DALI (the recipe schema refuses them too)."""
    return dali_problems(cfg)


def dali_pixel_problem(manifest: Manifest, cfg: Any, location: str) -> str | None:
    """DALI decodes on the GPU with no per-sample check rtrain can put before it: its shards must come with
    data_prep's attestation that every header was read against a pixel budget within data.max_image_pixels."""
    budget = cfg.max_image_pixels
    if manifest.checked_pixels is None:
        return (f"data.backend=dali: {location}: nothing says its images were checked against a pixel budget "
                f"(data.max_image_pixels {budget:,}; the manifest has no checked_pixels): DALI would decode a "
                "bomb (a few hundred bytes claiming 65500 x 65500) in full; rebuild the split with data_prep "
                "(it quarantines them), or use data.backend=webdataset, which checks every header")
    if manifest.checked_pixels > budget:
        return (f"data.backend=dali: {location}: its images were checked against {manifest.checked_pixels:,} "
                f"pixels, over data.max_image_pixels ({budget:,}); rebuild with data_prep --max-image-pixels "
                f"{budget} or raise data.max_image_pixels")
    return None


def require_dali(cfg: Any) -> Any:
    """Import DALI or fail with what is missing."""
    problems = check_dali_recipe(cfg)
    if problems:
        raise ValueError("data.backend=dali: " + "; ".join(problems))
    if not torch.cuda.is_available():
        raise RuntimeError("data.backend=dali needs a CUDA GPU; none is visible (use data.backend=webdataset)")
    try:
        import nvidia.dali
    except ImportError as exc:
        raise RuntimeError("data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                           "--extra-index-url https://pypi.nvidia.com") from exc
    return nvidia.dali


def _labels_from_ascii(raw: torch.Tensor) -> torch.Tensor:
    """(N, L) zero-padded ASCII digit rows (the `cls` field) -> int64 labels."""
    digits = raw.to(torch.int64) - ord("0")
    valid = (digits >= 0) & (digits <= 9)
    labels = torch.zeros(raw.shape[0], dtype=torch.int64, device=raw.device)
    for column in range(raw.shape[1]):
        labels = torch.where(valid[:, column], labels * 10 + digits[:, column], labels)
    return labels


class DaliLoader:
    """The ShardLoader interface over a DALI pipeline (batches already on the GPU)."""

    def __init__(self, cfg: Any, split: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 train: bool):
        require_dali(cfg)
        location = f"{cfg.source.rstrip('/')}/{split}"
        self.manifest = Manifest.load(f"{location}/{MANIFEST_NAME}")
        problem = dali_pixel_problem(self.manifest, cfg, location)
        if problem:
            raise ValueError(problem)
        self.cfg, self.train, self.seed, self.batch_size = cfg, train, seed, batch_size
        self.rank, self.world_size = rank, world_size
        keys = self.manifest.keys
        if keys.label_field is not None or keys.label.endswith("json"):
            raise ValueError(f"data.backend=dali: {location} labels are a JSON field; DALI reads ASCII labels only")
        self.fields = list(keys.fields)  # DALI decodes jpg/png/webp alike (nvJPEG or its CPU fallback)
        root = resolve_shard_root(location, self.manifest.shard_root)
        if "://" in root:
            raise ValueError(f"data.backend=dali: the manifest's shards are at {root}; DALI reads local files only")
        self.paths = [f"{root}/{entry.name}" for entry in self.manifest.shards]
        total = self.manifest.num_samples
        per_rank = -(-total // world_size)
        self.batches = total // (world_size * batch_size) if train else -(-per_rank // batch_size)
        self.epoch, self.batches_done = 0, 0
        self.stats = {"skipped_samples": 0, "bad_samples": 0, "skipped_shards": 0}
        self._checkpoints: list[str] | None = None
        self._iterator = None

    @property
    def classes(self) -> dict[str, int]:
        return dict(self.manifest.classes)

    @property
    def num_samples(self) -> int:
        return self.batches * self.batch_size * self.world_size if self.train else self.manifest.num_samples

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg, size, train = self.cfg, self.cfg.image_size, self.train

        @pipeline_def(enable_checkpointing=True)
        def pipeline():
            jpegs, labels = fn.readers.webdataset(
                paths=self.paths, ext=self.fields, shard_id=self.rank, num_shards=self.world_size,
                random_shuffle=train, initial_fill=cfg.shuffle_buffer, pad_last_batch=not train,
                seed=self.seed, name="reader", missing_component_behavior="error")
            if train and cfg.augment == "rrc":
                images = fn.decoders.image_random_crop(
                    jpegs, device="mixed", output_type=types.RGB, random_area=list(cfg.rrc_scale),
                    random_aspect_ratio=list(cfg.rrc_ratio), num_attempts=10)
                images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
                images = fn.resize(images, resize_shorter=cfg.eval_resize, antialias=True)
                mirror = 0
            images = fn.crop_mirror_normalize(
                images, dtype=types.UINT8, crop=(size, size), mirror=mirror,
                output_layout="HWC" if cfg.channels_last else "CHW")
            return images, fn.pad(labels, fill_value=0).gpu()

        pipe = pipeline(batch_size=self.batch_size, num_threads=max(1, cfg.num_workers),
                        device_id=torch.cuda.current_device(), seed=self.seed,
                        checkpoint=self._checkpoints[0] if self._checkpoints else None)
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(pipe, ["images", "labels"], size=self.batches * self.batch_size,
                                   last_batch_policy=policy, auto_reset=True)

    def __iter__(self):
        if self._iterator is None:
            self._iterator = self._build()
        while self.batches_done < self.batches:
            batch = next(self._iterator)[0]
            images = batch["images"]
            if self.cfg.channels_last:
                images = images.permute(0, 3, 1, 2)
            self.batches_done += 1
            yield images, _labels_from_ascii(batch["labels"])

    def state_dict(self) -> dict[str, Any]:
        checkpoints = self._iterator.checkpoints() if self._iterator is not None else self._checkpoints
        return {"version": DALI_STATE_VERSION, "backend": "dali", "epoch": self.epoch,
                "batches_done": self.batches_done, "world_size": self.world_size,
                "dali_checkpoints": list(checkpoints or [])}

    def load_state_dict(self, raw: dict[str, Any]) -> None:
        if raw.get("backend") != "dali" or raw.get("version") != DALI_STATE_VERSION:
            raise ValueError("loader state: not a DALI loader state of version 1 (backend changed?)")
        if raw["world_size"] != self.world_size:
            raise ValueError("loader state: the DALI backend cannot resume with a different world size")
        self.epoch, self.batches_done = int(raw["epoch"]), int(raw["batches_done"])
        self._checkpoints = list(raw["dali_checkpoints"]) or None
        self._iterator = None
