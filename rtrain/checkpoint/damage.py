"""What to do with checkpoints that fail verification: never train over them, never delete them.

A damaged checkpoint is evidence (and its weights may be recoverable by hand), so rtrain only ever moves one
aside, to `<root>/damaged/step-N/` (renamed as it is, byte for byte, plus a `step-N.reason` file beside it
saying why). That happens when:
- resuming falls back past damaged checkpoints to an older verified one: the newer damaged ones are moved
  aside, so that training passing their step again cannot save over them and pruning never counts them;
- a save is about to publish a step whose folder already exists and fails verification;
- pruning finds an older checkpoint whose manifest or file sizes are wrong (it is not counted as kept);
- no checkpoint verifies and the recipe says `checkpoint.on_all_damaged: restart` (train from step 0).
With the default `refuse`, a run whose checkpoints all fail verification does not start (CheckpointsDamaged)
and touches nothing. rtrain never empties `damaged/`: that is for a person to do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rtrain._io import fsync_dir
from rtrain.checkpoint import files
from rtrain.checkpoint.files import CheckpointError

logger = logging.getLogger("rtrain.checkpoint")

DAMAGED_DIR = "damaged"
ON_ALL_DAMAGED = ("refuse", "restart")
_NAMED_IN_MESSAGE = 3  # damaged checkpoints spelled out in the one-line refusal


class CheckpointsDamaged(CheckpointError):
    """Checkpoints exist but none verifies; the run refuses to start rather than train over them from 0."""


@dataclass(frozen=True)
class Damaged:
    path: Path
    reason: str  # the CheckpointError's message (it names the directory and the file)


def short_reason(damaged: Damaged) -> str:
    """The reason without the directory prefix the CheckpointError message starts with."""
    prefix = f"{damaged.path}: "
    return damaged.reason[len(prefix):] if damaged.reason.startswith(prefix) else damaged.reason


def refusal(root: Path, damaged: list[Damaged]) -> CheckpointsDamaged:
    """The one-line error for 'checkpoints exist, none verifies'."""
    named = "; ".join(f"{d.path.name}: {short_reason(d)}" for d in damaged[:_NAMED_IN_MESSAGE])
    more = f"; and {len(damaged) - _NAMED_IN_MESSAGE} more" if len(damaged) > _NAMED_IN_MESSAGE else ""
    return CheckpointsDamaged(
        f"{root}: {len(damaged)} checkpoint(s), none verifies ({named}{more}); refusing to train from step 0 "
        f"over them. Repair or move them away, or set checkpoint.on_all_damaged=restart to start from step 0 "
        f"with them moved to {root / DAMAGED_DIR}/")


def move_aside(root: Path, step_dir: Path, reason: str) -> Path | None:
    """Rename a damaged step folder into `root/damaged/` (never over an earlier one); None if it is gone
    already (another process moved it)."""
    target_dir = root / DAMAGED_DIR
    target_dir.mkdir(exist_ok=True)
    target = target_dir / step_dir.name
    attempt = 1
    while target.exists() or target.with_name(f"{target.name}.reason").exists():
        attempt += 1
        target = target_dir / f"{step_dir.name}-{attempt}"
    try:
        os.rename(step_dir, target)
    except FileNotFoundError:
        return None
    target.with_name(f"{target.name}.reason").write_text(reason + "\n")
    fsync_dir(target_dir)
    fsync_dir(root)
    logger.warning("moved damaged checkpoint %s to %s (%s)", step_dir, target, reason)
    return target


def check_policy(on_all_damaged: str) -> None:
    if on_all_damaged not in ON_ALL_DAMAGED:
        raise ValueError(f"on_all_damaged must be one of {ON_ALL_DAMAGED}, got {on_all_damaged!r}")


def damage_of(step_dir: Path, read_bytes: bool = True) -> str | None:
    """Why a published step folder fails verification (None: it verifies). With `read_bytes` False only the
    manifest and the file sizes are checked (cheap: no file is read)."""
    try:
        manifest = files.read_manifest(step_dir)
        files.check_step_name(step_dir, manifest)
        (files.verify_files if read_bytes else files.verify_sizes)(step_dir, manifest)
    except CheckpointError as error:
        return str(error)
    return None
