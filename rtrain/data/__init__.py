"""Input pipeline: WebDataset shards -> deterministic, exactly resumable uint8 batches per rank.

    loader = build_loader(cfg.data, "train", rank=r, world_size=w, batch_size=b, seed=s, train=True)
    loader.set_epoch(e)
    for images, labels in DevicePrefetcher(iter(loader), device): ...

Modules: format (shard/manifest contract, shared with data_prep), sources (a split's manifest and shards),
stores (byte streams: files, http(s), s3:// and other fsspec URLs, with retries), shardread (tar members ->
samples), plan (who reads what, in which order), state (resumable position), transforms (crop geometry),
decode (reduced-scale decoding + uint8 resize), worker (DataLoader workers), pipeline (ShardLoader), whole
(uncropped val images for multi-scale testing), prefetch (device copies one batch ahead), dali (optional GPU
backend).
"""

from __future__ import annotations

from typing import Any

from rtrain.data.decode import DecodeError
from rtrain.data.pipeline import ShardLoader
from rtrain.data.prefetch import DevicePrefetcher
from rtrain.data.sources import ShardError
from rtrain.data.whole import WholeImageLoader
from rtrain.data.worker import LoaderStall, SampleError
from rtrain.data.eval_sizes import ten_crop_square


def build_loader(cfg: Any, split: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 train: bool, ledger: Any = None, guard: Any = None) -> Any:
    """The loader for one split on one rank; `cfg` is the recipe's DataConfig; `ledger` a file to append
    each batch's sample ids to (rtrain.data.ledger)."""
    if cfg.backend == "dali":
        from rtrain.data.dali import DaliLoader

        return DaliLoader(cfg, split, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                          train=train)
    if cfg.backend != "webdataset":
        raise ValueError(f"data.backend: unknown backend {cfg.backend!r}")
    return ShardLoader(cfg, split, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                       train=train, ledger=ledger, guard=guard)


def steps_per_epoch(loader: Any, cfg: Any, global_batch: int) -> int:
    """A training loader's steps per epoch (every rank runs as many); an error naming the data when the split
    holds less than one global batch."""
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"data.source={cfg.source}: fewer training samples than one global batch "
                         f"(train.global_batch={global_batch})")
    return steps


def build_eval_loader(cfg: Any, split: str, *, mode: str, rank: int, world_size: int, batch_size: int, seed: int,
                      scales: list[int] | tuple[int, ...] = ()) -> Any:
    """The input of one of the paper's testing modes (rtrain.engine.evaluate): `center` gets the eval
    transform's view; `ten_crop` the center square the engine cuts the 10 crops from (`eval_resize` where it
    fits the model's input `image_size`, else sized to it: rtrain.engine.eval_views.ten_crop_square);
    `multi_scale` whole images (WholeImageLoader), decoded at a reduced scale down to the largest of `scales`."""
    if mode == "multi_scale":
        if not scales:
            raise ValueError("multi_scale evaluation needs its scales (shorter sides), got none")
        return WholeImageLoader(cfg, split, rank=rank, world_size=world_size, batch_size=batch_size,
                                min_shorter_side=max(scales))
    if mode not in ("center", "ten_crop"):
        raise ValueError(f"unknown eval mode {mode!r}; known: center, ten_crop, multi_scale")
    if mode == "center":
        view_cfg = cfg
    else:
        square = ten_crop_square(cfg.image_size, cfg.eval_resize, cfg.eval_transform).side
        view_cfg = cfg.model_copy(update={"image_size": square})
    return build_loader(view_cfg, split, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                        train=False)


__all__ = ["DecodeError", "DevicePrefetcher", "LoaderStall", "SampleError", "ShardError", "ShardLoader",
           "WholeImageLoader", "build_eval_loader", "build_loader", "steps_per_epoch"]
