"""ImageNet-style folders -> verified WebDataset shards, in parallel on Ray.

    python -m data_prep.imagenet --src SRC --out OUT [--val-ground-truth FILE] [options]

Layouts: ``SRC/train/<wnid>/*`` and either ``SRC/val/<wnid>/*`` or a flat ``SRC/val/*`` plus
``--val-ground-truth`` (Kaggle csv, devkit ids + meta.mat, ``<file> <wnid>`` pairs or a wnid list; see
data_prep.ground_truth). The class list is the sorted train wnids (index = torchvision ImageFolder's).
Writes ``OUT/{split}/{split}-{i:06d}.tar`` and ``OUT/{split}/manifest.json`` (format: rtrain.data.format).

A class folder without any file is reported and left out of the class list (``--keep-empty-classes`` keeps
it, and with it the class indices of a folder listing); the manifest lists it under ``empty_classes``.
Every file below a class folder is an input: images are verified and sanitized (data_prep.quirks),
anything unusable is quarantined and listed in the manifest with its reason, and a summary table closes
the run. Keys are file names without extension (``n01440764_10026``, ``ILSVRC2012_val_00000001``).
Samples are shuffled globally by seed before sharding; the same input and options give byte-identical
shards. Rerunning after an interruption reuses every finished shard that verifies (data_prep.shards).
On a cluster: ``ray job submit --working-dir . -- python -m data_prep.imagenet ...`` with SRC and OUT on a
shared filesystem.

OUT may be an object-store URL (``s3://bucket/prefix``; endpoint and credentials from the AWS_* environment):
the shards are then built in a local staging folder (``--stage DIR``, resumable; default a temporary folder
removed after the upload) and uploaded when every split is complete, each split's manifest last
(data_prep.storage).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from data_prep.build import BuildOptions, JobRunner, SplitReport, SplitSource, build_split
from data_prep.ground_truth import GROUND_TRUTH_FORMATS, read_val_labels
from data_prep.parallel import ShardWriteError, ray_session, run_shard_jobs
from data_prep.plan import ShardSize, SourceFile, file_key
from data_prep.quirks import JPEG_CHECKS, ImageOptions
from data_prep.report import format_summary
from data_prep.storage import upload_output
from rtrain.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from rtrain.data.format import QuarantinedFile
from rtrain.data.stores import ShardError, is_remote

SPLITS = ("train", "val")
STRAY_REASON = "outside class folders (not an input of any class)"


def _files_below(directory: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        found.extend(Path(root) / name for name in sorted(names))
    return found


def _has_files(directory: Path) -> bool:
    """Any file below `directory` (stops at the first: cheap on ImageNet's 1,300-file folders)."""
    return any(names for _, _, names in os.walk(directory))


def _source_file(path: Path, src_root: Path, cls: int) -> SourceFile:
    return SourceFile(file_key(path.name), path.relative_to(src_root).as_posix(), cls, path.stat().st_size)


def _check_unique_keys(split: str, files: list[SourceFile]) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for source in files:
        if source.key in seen:
            clashes.append(f"{seen[source.key]} and {source.relpath}")
        seen.setdefault(source.key, source.relpath)
    if clashes:
        raise ValueError(f"{split}: {len(clashes)} files share a key (name without extension), e.g. {clashes[:3]}")


def _class_folders(split_root: Path) -> list[Path]:
    return sorted(p for p in split_root.iterdir() if p.is_dir())


def _stray_files(split_root: Path, src_root: Path) -> list[QuarantinedFile]:
    return [
        QuarantinedFile(p.relative_to(src_root).as_posix(), STRAY_REASON)
        for p in sorted(split_root.iterdir())
        if p.is_file()
    ]


def index_class_folders(split: str, src_root: Path, classes: dict[str, int]) -> SplitSource:
    """Every file below the split's class folders; empty class folders are listed (`empty_classes`)."""
    split_root = src_root / split
    files, empty = [], []
    for folder in _class_folders(split_root):
        below = _files_below(folder)
        if not below:
            empty.append(folder.name)
            continue
        if folder.name not in classes:
            left_out = (src_root / "train" / folder.name).is_dir() and split != "train"
            hint = (" (its train folder is empty, so the class was left out; pass --keep-empty-classes to keep "
                    "it)") if left_out else ""
            raise ValueError(f"{folder}: class folder {folder.name!r} is not among the train classes{hint}")
        files.extend(_source_file(p, src_root, classes[folder.name]) for p in below)
    _check_unique_keys(split, files)
    return SplitSource(split, files, _stray_files(split_root, src_root), empty)


def index_flat_val(src_root: Path, classes: dict[str, int], args: argparse.Namespace) -> SplitSource:
    paths = sorted(p for p in (src_root / "val").iterdir() if p.is_file())
    keys = [file_key(p.name) for p in paths]
    labels = read_val_labels(args.val_ground_truth, keys, args.val_ground_truth_format, args.devkit_meta)
    unknown = sorted({wnid for wnid in labels.values() if wnid not in classes})
    if unknown:
        raise ValueError(f"{args.val_ground_truth}: wnids not among the train classes: {unknown[:5]}")
    files = [_source_file(p, src_root, classes[labels[key]]) for p, key in zip(paths, keys)]
    _check_unique_keys("val", files)
    return SplitSource("val", files)


def is_flat(split_root: Path) -> bool:
    return not _class_folders(split_root)


def discover_classes(src_root: Path, keep_empty: bool = False) -> dict[str, int]:
    """Sorted wnids of train/ (of val/ when there is no train/), for every split. A class folder without any
    file is left out (the later classes move down one index) unless `keep_empty`: then the indices are
    ImageFolder's (`allow_empty=True`) and the class simply has no samples. Either way the manifests list it."""
    for split in ("train", "val"):
        split_root = src_root / split
        if split_root.is_dir() and not is_flat(split_root):
            folders = [f for f in _class_folders(split_root) if keep_empty or _has_files(f)]
            if not folders:
                raise ValueError(f"{split_root}: every class folder is empty")
            return {folder.name: i for i, folder in enumerate(folders)}
    raise ValueError(f"{src_root}: no class folders under train/ or val/ to take the class list from")


def index_source(src_root: Path, splits: list[str], args: argparse.Namespace) -> tuple[dict[str, int], list[SplitSource]]:
    for split in splits:
        if not (src_root / split).is_dir():
            raise ValueError(f"{src_root / split}: split folder not found")
    classes = discover_classes(src_root, getattr(args, "keep_empty_classes", False))
    sources = []
    for split in splits:
        if split == "val" and is_flat(src_root / "val"):
            if args.val_ground_truth is None:
                raise ValueError(f"{src_root / 'val'} is flat: pass --val-ground-truth FILE")
            sources.append(index_flat_val(src_root, classes, args))
        else:
            if split == "val" and args.val_ground_truth is not None:
                raise ValueError(f"{src_root / 'val'} has class folders: --val-ground-truth does not apply")
            sources.append(index_class_folders(split, src_root, classes))
    return classes, sources


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100MB, 1GiB, 50000000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.imagenet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="folder holding train/ and/or val/")
    parser.add_argument("--out", type=_out_location, required=True,
                        help="output folder (OUT/train, OUT/val), or an object-store URL such as s3://bucket/prefix")
    parser.add_argument("--stage", type=Path, default=None,
                        help="with a URL --out: local folder to build in before the upload (kept, resumable)")
    parser.add_argument("--splits", default=None, help="comma list (default: those of train,val present)")
    parser.add_argument("--val-ground-truth", type=Path, default=None, help="labels for a flat val/")
    parser.add_argument("--val-ground-truth-format", choices=GROUND_TRUTH_FORMATS, default="auto")
    parser.add_argument("--devkit-meta", type=Path, default=None, help="devkit meta.mat (or wnids in ILSVRC2012_ID order)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=None, help="samples per shard (default 1000)")
    size.add_argument("--shard-bytes", type=parse_size, default=None, help="source bytes per shard, e.g. 100MB")
    parser.add_argument("--max-side", type=int, default=None, help="re-encode images larger than this (px)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="quarantine an image whose header claims more pixels (width x height) than this, "
                             "before decoding it (default: the loader's data.max_image_pixels)")
    parser.add_argument("--check", choices=JPEG_CHECKS, default="structure",
                        help="JPEG verification: header + scan structure (default), or a 1/8-scale decode")
    parser.add_argument("--keep-empty-classes", action="store_true",
                        help="keep class folders without any file in the class list (indices as "
                             "ImageFolder's with allow_empty=True); by default they are left out. Listed in the "
                             "manifest either way")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _out_location(text: str) -> Path | str:
    return text.rstrip("/") if is_remote(text) else Path(text)


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    shard_size = ShardSize(samples=None, bytes=args.shard_bytes) if args.shard_bytes else ShardSize(args.shard_size or 1000)
    return BuildOptions(args.seed, shard_size, ImageOptions(args.max_side, args.quality, args.check,
                                                                 args.max_image_pixels),
                        not args.no_progress, getattr(args, "keep_empty_classes", False))


def run(args: argparse.Namespace, run_jobs: JobRunner | None = None) -> list[SplitReport]:
    """Index, then build every split; shard jobs go to Ray unless another ``run_jobs`` is given."""
    src_root = args.src.resolve()
    if not src_root.is_dir():
        raise ValueError(f"--src {args.src}: not a directory")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    present = [s for s in SPLITS if (src_root / s).is_dir()]
    splits = args.splits.split(",") if args.splits else present
    options = options_from_args(args)
    classes, sources = index_source(src_root, splits, args)
    if run_jobs is not None:
        return [build_split(s, classes, src_root, args.out.resolve(), options, run_jobs) for s in sources]
    with ray_session(args.ray_address, args.workers):
        return [build_split(s, classes, src_root, args.out.resolve(), options, run_shard_jobs) for s in sources]


def run_to_store(args: argparse.Namespace, run_jobs: JobRunner | None = None) -> list[SplitReport]:
    """Build into the staging folder, then upload it to the URL in ``args.out``."""
    url = args.out
    stage = args.stage or Path(tempfile.mkdtemp(prefix="data_prep-stage-"))
    reports = run(argparse.Namespace(**{**vars(args), "out": stage}), run_jobs)
    try:
        upload_output(stage, url)
    except (OSError, ShardError) as exc:
        raise ValueError(f"upload of {stage} to {url} failed ({' '.join(str(exc).split())}); rerun to resume"
                         + ("" if args.stage else " (pass --stage DIR to keep the built shards)")) from exc
    if args.stage is None:
        shutil.rmtree(stage, ignore_errors=True)
    return reports


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        reports = run_to_store(args) if isinstance(args.out, str) else run(args)
    except (ValueError, ShardWriteError) as exc:
        print(f"data_prep.imagenet: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
