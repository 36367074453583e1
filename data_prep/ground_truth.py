"""Validation labels for a flat ``val/`` folder, from the ground-truth files in circulation.

Formats (``auto`` detects them from the content):

- ``kaggle``: ``LOC_val_solution.csv`` -- header ``ImageId,PredictionString``; the first token of the
  prediction string is the wnid.
- ``devkit``: ``ILSVRC2012_validation_ground_truth.txt`` -- line i holds the ILSVRC2012_ID (1..1000) of
  ``ILSVRC2012_val_{i:08d}``. Those ids follow the devkit's own class order (``meta.mat``), NOT the sorted
  wnids, so the devkit class list is required: ``meta.mat`` itself or a text file whose line k starts with
  the wnid of ILSVRC2012_ID k. A ``meta.mat`` next to the ground-truth file is used when none is given.
- ``pairs``: one ``<file> <wnid>`` per line (file with or without extension or directory).
- ``wnids``: one wnid per line, in the sorted order of the val files
  (e.g. ``imagenet_2012_validation_synset_labels.txt``).

The result maps a val file's key (its name without extension) to its wnid.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from data_prep.plan import file_key

GROUND_TRUTH_FORMATS = ("auto", "kaggle", "devkit", "pairs", "wnids")
KAGGLE_HEADER = "ImageId"
DEVKIT_META_NAME = "meta.mat"


def devkit_val_key(index: int) -> str:
    return f"ILSVRC2012_val_{index:08d}"


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ground-truth file ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def detect_format(path: Path, lines: list[str]) -> str:
    if not lines:
        raise ValueError(f"{path}: ground-truth file is empty")
    if lines[0].startswith(KAGGLE_HEADER):
        return "kaggle"
    token_counts = {len(line.replace(",", " ").split()) for line in lines}
    if token_counts == {1}:
        return "devkit" if all(line.isdigit() for line in lines) else "wnids"
    if token_counts == {2}:
        return "pairs"
    raise ValueError(f"{path}: cannot tell the ground-truth format; pass --val-ground-truth-format")


def read_devkit_classes(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat or a text file in ILSVRC2012_ID order."""
    if path.suffix.lower() == ".mat":
        return _read_meta_mat(path)
    return {line_no: line.split()[0] for line_no, line in enumerate(_read_lines(path), start=1)}


def _read_meta_mat(path: Path) -> dict[int, str]:
    import numpy as np
    from scipy.io import loadmat  # only devkit users pay for importing scipy

    try:
        synsets = np.atleast_1d(loadmat(str(path), squeeze_me=True, struct_as_record=False)["synsets"])
        return {int(s.ILSVRC2012_ID): str(s.WNID) for s in synsets}
    except (OSError, KeyError, AttributeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a devkit meta.mat with synsets/ILSVRC2012_ID/WNID ({exc})") from exc


def _parse_kaggle(path: Path, lines: list[str]) -> dict[str, str]:
    labels = {}
    for line_no, line in enumerate(lines[1:], start=2):
        image_id, _, prediction = line.partition(",")
        tokens = prediction.split()
        if not image_id or not tokens:
            raise ValueError(f"{path}:{line_no}: expected 'ImageId,wnid ...', got {line!r}")
        labels[image_id.strip()] = tokens[0]
    return labels


def _parse_devkit(path: Path, lines: list[str], devkit_classes: dict[int, str]) -> dict[str, str]:
    labels = {}
    for line_no, line in enumerate(lines, start=1):
        class_id = int(line)
        if class_id not in devkit_classes:
            raise ValueError(f"{path}:{line_no}: ILSVRC2012_ID {class_id} is not in the devkit class list")
        labels[devkit_val_key(line_no)] = devkit_classes[class_id]
    return labels


def _parse_pairs(path: Path, lines: list[str]) -> dict[str, str]:
    labels = {}
    for line_no, line in enumerate(lines, start=1):
        tokens = line.replace(",", " ").split()
        if len(tokens) != 2:
            raise ValueError(f"{path}:{line_no}: expected '<file> <wnid>', got {line!r}")
        file_name, wnid = tokens
        labels[file_key(PurePath(file_name).name)] = wnid
    return labels


def _parse_wnids(path: Path, lines: list[str], sorted_keys: list[str]) -> dict[str, str]:
    if len(lines) != len(sorted_keys):
        raise ValueError(
            f"{path}: {len(lines)} wnids for {len(sorted_keys)} val files; a wnid list must have one "
            "line per val file, in sorted file order"
        )
    return dict(zip(sorted_keys, lines))


def _find_devkit_classes(path: Path, devkit_meta: Path | None) -> dict[int, str]:
    meta = devkit_meta or path.parent / DEVKIT_META_NAME
    if not meta.is_file():
        raise ValueError(
            f"{path}: devkit ground truth uses the devkit's ILSVRC2012_ID class order; pass --devkit-meta "
            f"(meta.mat or a wnid list in ILSVRC2012_ID order); {meta} does not exist"
        )
    return read_devkit_classes(meta)


def read_val_labels(
    path: Path, val_keys: list[str], fmt: str = "auto", devkit_meta: Path | None = None
) -> dict[str, str]:
    """Map every key in ``val_keys`` to its wnid; a val file without a label is an error naming it."""
    if fmt not in GROUND_TRUTH_FORMATS:
        raise ValueError(f"ground-truth format {fmt!r} is not one of {GROUND_TRUTH_FORMATS}")
    lines = _read_lines(path)
    fmt = detect_format(path, lines) if fmt == "auto" else fmt
    if fmt == "kaggle":
        labels = _parse_kaggle(path, lines)
    elif fmt == "devkit":
        labels = _parse_devkit(path, lines, _find_devkit_classes(path, devkit_meta))
    elif fmt == "pairs":
        labels = _parse_pairs(path, lines)
    else:
        labels = _parse_wnids(path, lines, sorted(val_keys))
    unlabeled = [key for key in val_keys if key not in labels]
    if unlabeled:
        raise ValueError(
            f"{path} ({fmt}): no label for {len(unlabeled)} val files, e.g. {', '.join(sorted(unlabeled)[:5])}"
        )
    return {key: labels[key] for key in val_keys}
