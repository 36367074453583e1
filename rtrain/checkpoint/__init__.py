"""Atomic, verified, keep-k checkpoints written by every rank of a job without collectives.

manager: CheckpointManager (save / wait / latest / resume / load / list / close); commit: how the ranks
agree on a complete step dir; damage: checkpoints that fail verification (moved aside, never overwritten,
a run refusing to restart over them); files: the on-disk format and its verification; snapshot: copies of
state that load back with torch.load(weights_only=True).
"""

from rtrain.checkpoint.damage import CheckpointsDamaged
from rtrain.checkpoint.files import CheckpointError, UnsafeStateError
from rtrain.checkpoint.manager import CheckpointManager, Loaded

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointsDamaged", "Loaded", "UnsafeStateError"]
