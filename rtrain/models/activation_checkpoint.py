"""Per-stage activation checkpointing that leaves BatchNorm running statistics exact.

torch.utils.checkpoint recomputes a stage's forward during backward. In training mode every
BatchNorm would then update its running mean/var and `num_batches_tracked` a second time, so a
checkpointed model would drift from an uncheckpointed one. The recomputation therefore restores the
norm layers' buffers afterwards; training-mode BN normalizes with batch statistics, so the
recomputed activations are the originals and outputs and gradients are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint


@contextmanager
def running_stats_restored(module: nn.Module) -> Iterator[None]:
    """Norm-layer buffers under `module` (running mean/var, batch count) end the block unchanged.

    Snapshot-and-restore rather than switching tracking off: the recomputation must run the very
    same ops as the original forward, or the checkpoint's saved-tensor check fails.
    """
    buffers = [
        buffer
        for norm in module.modules()
        if isinstance(norm, _NormBase) and norm.track_running_stats
        for buffer in norm.buffers(recurse=False)
        if buffer is not None
    ]
    snapshot = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, snapshot, strict=True):
                buffer.copy_(saved)


def run_checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """stage(x), keeping only x for backward and recomputing the stage's activations there."""
    return checkpoint(
        stage,
        x,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), running_stats_restored(stage)),
    )


def should_checkpoint(module: nn.Module) -> bool:
    """Checkpointing only pays off when a backward pass will follow."""
    return module.training and torch.is_grad_enabled()
