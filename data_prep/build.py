"""Build one split: plan its shards, run them (reusing verified ones), then write the manifest.

The manifest is removed first and written (temp + rename) only when every shard is done, so a split
directory with a manifest is always complete. Shards left over from an earlier plan are deleted.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_prep.plan import PREP_FORMAT, ShardSize, SourceFile, plan_shards, shard_fingerprint
from data_prep.quirks import ImageOptions
from data_prep.shards import RECEIPTS_DIR, TEMP_MARKER, ShardJob, ShardResult, temp_name
from rtrain._io import write_atomically
from rtrain.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from rtrain.data.format import MANIFEST_NAME, Manifest, QuarantinedFile, shard_name

JobRunner = Callable[[list[ShardJob], bool, str], dict[str, tuple[ShardResult, bool]]]


@dataclass(frozen=True)
class SplitSource:
    """What the indexer found for one split; ``stray`` files are quarantined without being read."""

    split: str
    files: list[SourceFile]
    stray: list[QuarantinedFile] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # class folders without any file


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    shard_size: ShardSize = ShardSize()
    image_options: ImageOptions = ImageOptions()
    progress: bool = True
    keep_empty_classes: bool = False

    def manifest_options(self) -> dict:
        # Only what determines the bytes: worker count, paths and Ray address do not belong here.
        return {
            "format": PREP_FORMAT,
            "seed": self.seed,
            "shard_samples": self.shard_size.samples,
            "shard_bytes": self.shard_size.bytes,
            "max_side": self.image_options.max_side,
            "quality": self.image_options.quality,
            "check": self.image_options.check,
            "keep_empty_classes": self.keep_empty_classes,
            # only when changed: shards built before the option existed keep their fingerprint
            **({"max_image_pixels": self.image_options.max_image_pixels}
               if self.image_options.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS else {}),
        }


@dataclass(frozen=True)
class SplitReport:
    manifest: Manifest
    files_found: int
    grayscale: int
    shards_reused: int


def plan_jobs(source: SplitSource, src_root: Path, split_dir: Path, options: BuildOptions) -> list[ShardJob]:
    return [
        ShardJob(
            name=shard_name(source.split, index),
            files=files,
            src_root=str(src_root),
            split_dir=str(split_dir),
            image_options=options.image_options,
            fingerprint=shard_fingerprint(files, options.image_options),
        )
        for index, files in enumerate(plan_shards(source.files, options.seed, options.shard_size))
    ]


def _remove_leftovers(split_dir: Path, split: str, planned: set[str]) -> None:
    """Temp files of killed runs, and shards (with receipts) that the current plan does not contain."""
    (split_dir / MANIFEST_NAME).unlink(missing_ok=True)
    receipts = split_dir / RECEIPTS_DIR
    for directory in (split_dir, receipts):
        for path in directory.glob(f".*{TEMP_MARKER}*"):
            path.unlink(missing_ok=True)
    for path in split_dir.glob(f"{split}-*.tar"):
        if path.name not in planned:
            path.unlink()
            (receipts / f"{path.name}.json").unlink(missing_ok=True)


def _write_manifest(split_dir: Path, manifest: Manifest) -> None:
    write_atomically(split_dir / MANIFEST_NAME, manifest.to_json(), temp_name(MANIFEST_NAME, str(os.getpid())))


def build_split(
    source: SplitSource,
    classes: dict[str, int],
    src_root: Path,
    out_root: Path,
    options: BuildOptions,
    run_jobs: JobRunner,
) -> SplitReport:
    split_dir = out_root / source.split
    split_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(source, src_root, split_dir, options)
    _remove_leftovers(split_dir, source.split, {job.name for job in jobs})
    outcomes = run_jobs(jobs, options.progress, source.split)
    results = [outcomes[job.name][0] for job in jobs]
    converted: Counter = Counter()
    for result in results:
        converted.update(result.converted)
    quarantined = list(source.stray) + [q for result in results for q in result.quarantined]
    manifest = Manifest(
        split=source.split,
        shards=[result.entry for result in results],
        classes=dict(classes),
        converted=dict(sorted(converted.items())),
        quarantined=sorted(quarantined, key=lambda q: q.path),
        options=options.manifest_options(),
        empty_classes=sorted(source.empty_classes),
        checked_pixels=options.image_options.max_image_pixels,  # every header was read against it (quirks.py)
    )
    _write_manifest(split_dir, manifest)
    return SplitReport(
        manifest=manifest,
        files_found=len(source.files) + len(source.stray),
        grayscale=sum(result.grayscale for result in results),
        shards_reused=sum(reused for _, reused in outcomes.values()),
    )
