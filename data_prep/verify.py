"""Re-read every shard of a data_prep output and check it against its manifest.

    python -m data_prep.verify OUT [--workers N]

OUT is a data_prep output (holding train/, val/, ...) or one split folder. For each shard: size and
sha256 as in the manifest, a well-formed tar whose samples each have exactly ``jpg`` and ``cls``, the
manifest's sample count, keys unique within the split, ``cls`` a valid class index, and every ``jpg``
decoding completely (the same 1/8-scale decode as data_prep, which catches truncation). Exits 1 naming
each bad shard, 0 when everything verifies. Manifests of data_prep.index (other image/label keys, shards in
another local folder) are checked the same way against their keys, where extra members are allowed; shards
in an object store are re-checked by running data_prep.index again.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_prep.quirks import jpeg_decode_error
from data_prep.shards import iter_samples
from data_prep.wds_scan import image_error
from rtrain.data.format import (MANIFEST_NAME, Manifest, SampleKeys, ShardEntry, decode_label, resolve_shard_root,
                                sha256_file)
from rtrain.data.stores import is_remote

MAX_PROBLEMS_PER_SHARD = 5


@dataclass(frozen=True)
class ShardCheck:
    path: str
    problems: tuple[str, ...]
    keys: tuple[str, ...]


def _sample_problems(key: str, fields: dict[str, bytes], classes: dict[str, int], keys: SampleKeys) -> list[str]:
    own = keys == SampleKeys()  # data_prep's own shards hold exactly jpg + cls
    if (own and sorted(fields) != sorted(keys.fields)) or not set(keys.fields) <= set(fields):
        return [f"sample {key}: fields {sorted(fields)}, expected {sorted(keys.fields)}"]
    problems = []
    try:
        cls = decode_label(fields[keys.label], keys, classes)
        if not 0 <= cls < len(classes):
            problems.append(f"sample {key}: {keys.label} {cls} outside 0..{len(classes) - 1}")
    except ValueError as exc:
        problems.append(f"sample {key}: {keys.label} {fields[keys.label][:20]!r} is not a label ({exc})")
    image = fields[keys.image]
    error = (jpeg_decode_error(image) if own else image_error(image, "decode")) if image else f"empty {keys.image}"
    if error is not None:
        problems.append(f"sample {key}: {keys.image} does not decode: {error}")
    return problems


def check_shard(path: Path, entry: ShardEntry, classes: dict[str, int],
                sample_keys: SampleKeys = SampleKeys()) -> ShardCheck:
    if not path.is_file():
        return ShardCheck(str(path), ("missing",), ())
    problems = []
    size = path.stat().st_size
    if size != entry.bytes:
        problems.append(f"size {size} bytes, manifest says {entry.bytes}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        problems.append(f"sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}...")
    keys = []
    try:
        for key, fields in iter_samples(path):
            keys.append(key)
            problems.extend(_sample_problems(key, fields, classes, sample_keys))
    except ValueError as exc:
        problems.append(str(exc))
    if len(set(keys)) != len(keys):
        problems.append("a key appears in more than one sample")
    if len(keys) != entry.count:
        problems.append(f"{len(keys)} samples, manifest says {entry.count}")
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + [f"... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more"]
    return ShardCheck(str(path), tuple(problems), tuple(keys))


def _check_args(args: tuple[Path, ShardEntry, dict[str, int], SampleKeys]) -> ShardCheck:
    return check_shard(*args)


def split_dirs(out: Path) -> list[Path]:
    if (out / MANIFEST_NAME).is_file():
        return [out]
    found = sorted(p.parent for p in out.glob(f"*/{MANIFEST_NAME}"))
    if not found:
        raise ValueError(f"{out}: no {MANIFEST_NAME} here or in its subfolders (is this a data_prep output?)")
    return found


def verify_split(split_dir: Path, workers: int = 1) -> list[str]:
    """Problems as ``'<shard path>: <problem>'`` lines; empty when the split verifies."""
    manifest = Manifest.load(split_dir / MANIFEST_NAME)
    root = resolve_shard_root(str(split_dir), manifest.shard_root)
    if is_remote(root):
        raise ValueError(f"{split_dir}: its shards are at {root}; re-check them with python -m data_prep.index")
    tasks = [(Path(root) / entry.name, entry, manifest.classes, manifest.keys) for entry in manifest.shards]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            checks = list(pool.map(_check_args, tasks))
    else:
        checks = [_check_args(task) for task in tasks]
    problems = [f"{check.path}: {problem}" for check in checks for problem in check.problems]
    seen: dict[str, str] = {}
    for check in checks:
        for key in check.keys:
            if key in seen and seen[key] != check.path:
                problems.append(f"{check.path}: key {key} also in {seen[key]}")
            seen.setdefault(key, check.path)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="data_prep output folder or one split folder")
    parser.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")
    args = parser.parse_args(argv)
    try:
        dirs = split_dirs(args.out)
        problems = {split_dir: verify_split(split_dir, args.workers) for split_dir in dirs}
    except ValueError as exc:
        print(f"data_prep.verify: error: {exc}", file=sys.stderr)
        return 2
    for split_dir, found in problems.items():
        manifest = Manifest.load(split_dir / MANIFEST_NAME)
        status = "OK" if not found else f"{len(found)} problem(s)"
        print(f"{split_dir}: {len(manifest.shards)} shards, {manifest.num_samples} samples: {status}")
        for line in found:
            print(f"  BAD {line}")
    bad_shards = sorted({line.split(": ", 1)[0] for found in problems.values() for line in found})
    if bad_shards:
        print(f"{len(bad_shards)} bad shard(s): " + " ".join(Path(p).name for p in bad_shards), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
