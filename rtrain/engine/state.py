"""TrainState: where training stands. Checkpointed with everything else; resume continues from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

TRAIN_STATE_VERSION = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped fp16 overflow steps count: they consumed data)
    epoch: int = 0  # the epoch in progress
    samples_seen: int = 0  # training samples consumed over all ranks
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients
    nonfinite_streak: int = 0  # consecutive non-finite steps outside fp16 loss scaling
    best_top1: float = 0.0
    last_top1: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRAIN_STATE_VERSION, **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version != TRAIN_STATE_VERSION:
            raise ValueError(f"TrainState version {version!r} in checkpoint, expected {TRAIN_STATE_VERSION}")
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))
