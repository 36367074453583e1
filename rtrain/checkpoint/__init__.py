"""Atomic, verified, keep-k checkpoints written by every rank of a job without collectives.

manager: CheckpointManager (save / wait / latest / resume / load / list / close); commit: how the ranks
agree on a complete step dir; damage: checkpoints that fail verification (moved aside, never overwritten,
a run refusing to restart over them); files: the on-disk format and its verification; snapshot: copies of
state that load back with torch.load(weights_only=True); remote: the same in an object store (open_checkpoints
picks the manager for a folder or a URL), objects: what a step in a store must look like.
"""

import os
import stat
import tempfile
from typing import Any

from rtrain._remote import is_url
from rtrain.checkpoint.damage import CheckpointsDamaged
from rtrain.checkpoint.files import CheckpointError, UnsafeStateError
from rtrain.checkpoint.manager import CheckpointManager, Loaded

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointsDamaged", "Loaded", "UnsafeStateError",
           "open_checkpoints"]


def open_checkpoints(root: Any, *, staging: str | os.PathLike | None = None, save_tag: str = "",
                     retry_s: float = 300.0, **kwargs: Any) -> CheckpointManager:
    """The manager for `root`: a folder (CheckpointManager), or an object-store URL (remote.py, which stages
    files in `staging`, a local folder; default one of this user's under the system's temp folder)."""
    if not is_url(root):
        return CheckpointManager(root, **kwargs)
    from rtrain.checkpoint.remote import RemoteCheckpointManager

    if staging is None:
        staging = os.path.join(tempfile.gettempdir(), f"rtrain-checkpoint-staging-u{os.getuid()}")
        os.makedirs(staging, mode=0o700, exist_ok=True)
        info = os.lstat(staging)  # a name in a shared folder: someone else's (or a symlink) is not used
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            staging = tempfile.mkdtemp(prefix="rtrain-checkpoint-staging-")
    os.makedirs(staging, mode=0o700, exist_ok=True)
    return RemoteCheckpointManager(str(root), staging=staging, save_tag=save_tag, retry_s=retry_s, **kwargs)
