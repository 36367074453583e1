"""Write rtrain's manifest for WebDataset shards that already exist, without rewriting them.

    python -m data_prep.index SHARDS [SHARDS ...] --out OUT [--split train|val]
        [--image-key auto|jpg|jpeg|png|webp] [--label-key auto|cls|cls.txt|json] [--json-field label]
        [--classes FILE] [--check structure|decode] [--workers N]

SHARDS: folders or object-store prefixes (their *.tar, sorted by name), or shard paths/URLs, with braces
(`s3://bucket/in1k/train-{000000..000099}.tar`, `https://host/wds/val-{0000..0063}.tar`). Any WebDataset
writer's shards work (webdataset.ShardWriter/TarWriter, img2dataset, ImageNet WebDataset mirrors): `auto`
takes the first of jpg, jpeg, png, webp as the image and of cls, cls.txt, json as the label (a json label is
the `--json-field` of that object). Every shard is read once, streamed: its byte size and sha256 are
recorded and every sample is checked (image readable, label parses and is a valid class). Any problem is
printed as one line naming the shard, the sample key and the member, and no manifest is written (exit 1).

Classes: `--classes FILE` (local or URL) lists one class per line in index order; a line starting with a
WordNet id (`n01440764 tench, Tinca tinca`) names that wnid. Without it the classes come from the data: the
integer labels 0..max, or the sorted distinct names when the labels are names.

The manifest goes to OUT/SPLIT/manifest.json (OUT local or a URL). Its `shard_root` is null when the shards
are in that very folder, else their common folder: an absolute path or the URL, so the shards may stay on a
read-only mirror. Train with `data.source=OUT`.
"""

from __future__ import annotations

import argparse
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from data_prep.quirks import JPEG_CHECKS
from data_prep.storage import absolute, common_root, expand_shards, join, read_text, write_manifest
from data_prep.wds_scan import LABEL_KEYS, ShardScan, detect_keys, scan_shard
from rtrain.data.format import IMAGE_KEYS, Manifest, SampleKeys
from rtrain.data.stores import ShardError

WNID = re.compile(r"^n\d{8}\b")


@dataclass(frozen=True)
class IndexResult:
    manifest: Manifest | None
    where: str | None
    problems: list[str]


def read_classes(text: str) -> dict[str, int]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    names = [line.split()[0] if WNID.match(line) else line for line in lines]
    if len(set(names)) != len(names):
        raise ValueError("the classes file names a class twice")
    return {name: index for index, name in enumerate(names)}


def derive_classes(labels: set[Any]) -> dict[str, int]:
    names = sorted(v for v in labels if isinstance(v, str))
    numbers = [v for v in labels if isinstance(v, int)]
    if names and numbers:
        raise ValueError(f"labels mix class indices and class names (e.g. {numbers[0]} and {names[0]!r}): "
                         "pass --classes FILE")
    if names:
        return {name: index for index, name in enumerate(names)}
    return {str(index): index for index in range(max(numbers, default=-1) + 1)}


def label_problems(scans: list[ShardScan], classes: dict[str, int], label_key: str) -> list[str]:
    problems = []
    for scan in scans:
        for value, key in scan.first_key.items():
            index = classes.get(value) if isinstance(value, str) else value
            if index is None or not 0 <= index < len(classes):
                what = f"class name {value!r} not in the classes" if index is None else \
                    f"label {value} outside 0..{len(classes) - 1}"
                more = scan.labels[value] - 1
                problems.append(f"{scan.location}: sample {key!r}: {what} (key {label_key})"
                                + (f", and {more} more sample(s)" if more else ""))
    return problems


def _scan_all(shards: list[str], names: list[str], keys: SampleKeys, args: argparse.Namespace,
              storage_options: dict[str, Any] | None) -> list[ShardScan]:
    def one(item: tuple[str, str]) -> ShardScan:
        return scan_shard(item[0], item[1], keys, args.check, storage_options)

    with ThreadPoolExecutor(max(1, args.workers)) as pool:  # I/O-bound on object stores; decodes drop the GIL
        return list(pool.map(one, zip(shards, names)))


def index_shards(args: argparse.Namespace, storage_options: dict[str, Any] | None = None) -> IndexResult:
    shards = expand_shards(args.shards, storage_options)
    root, names = common_root(shards)
    keys = detect_keys(shards[0], args.image_key, args.label_key, args.json_field, storage_options)
    scans = _scan_all(shards, names, keys, args, storage_options)
    problems = [line for scan in scans for line in scan.problems]
    labels = {value for scan in scans for value in scan.labels}
    if args.classes:
        classes = read_classes(read_text(args.classes, storage_options))
    else:
        classes = derive_classes(labels)
    problems += label_problems(scans, classes, keys.label)
    if problems:
        return IndexResult(None, None, problems)
    split_location = join(absolute(args.out), args.split)
    manifest = Manifest(
        split=args.split,
        shards=[scan.entry for scan in scans],
        classes=classes,
        options={"indexed_by": "data_prep.index", "check": args.check},
        keys=keys,
        shard_root=None if root == split_location else root,
    )
    return IndexResult(manifest, write_manifest(split_location, manifest, storage_options), [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="shard folders/prefixes, or shard paths/URLs (braces allowed)")
    parser.add_argument("--out", required=True, help="output root (local or URL): OUT/SPLIT/manifest.json")
    parser.add_argument("--split", default="train", help="split name (train, val, ...)")
    parser.add_argument("--image-key", default="auto", choices=("auto", *IMAGE_KEYS))
    parser.add_argument("--label-key", default="auto", choices=("auto", *LABEL_KEYS))
    parser.add_argument("--json-field", default="label", help="field of a json label member holding the label")
    parser.add_argument("--classes", default=None, help="class list file (local or URL), one class per line")
    parser.add_argument("--check", choices=JPEG_CHECKS, default="structure",
                        help="JPEG check: header + scan structure (default), or a 1/8-scale decode")
    parser.add_argument("--workers", type=int, default=4, help="shards read in parallel")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = index_shards(args)
    except (ValueError, ShardError) as exc:
        print(f"data_prep.index: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if result.problems:
        for line in result.problems:
            print(f"BAD {line}", file=sys.stderr)
        print(f"data_prep.index: {len(result.problems)} problem(s); no manifest written", file=sys.stderr)
        return 1
    manifest = result.manifest
    print(f"{result.where}: {len(manifest.shards)} shards, {manifest.num_samples} samples, "
          f"{manifest.num_classes} classes, image key {manifest.keys.image!r}, label key {manifest.keys.label!r}"
          + (f" field {manifest.keys.label_field!r}" if manifest.keys.label_field else "")
          + (f", shards at {manifest.shard_root} (outside the index: train with "
             f"data.allowed_shard_roots=[{manifest.shard_root}])" if manifest.shard_root else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
