"""Atomic, verified, keep-k checkpoints written by every rank of a job without collectives.

manager: CheckpointManager (save / wait / latest / load / list / close); commit: how the ranks agree
on a complete step dir; files: the on-disk format and its verification; snapshot: copies of state
that load back with torch.load(weights_only=True).
"""

from rtrain.checkpoint.files import CheckpointError, UnsafeStateError
from rtrain.checkpoint.manager import CheckpointManager, Loaded

__all__ = ["CheckpointError", "CheckpointManager", "Loaded", "UnsafeStateError"]
