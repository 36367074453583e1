"""What a run records beside metrics: its checkpoints (a URI tag or the files), the final weights exported
torchvision-style, and the layer responses of Fig. 7 (metrics and a PNG).

Files the tracker sends are written under <run dir>/tracking/ first and sent from there, so a server outage
only delays them (the outbox names the file, which is still there when the server answers again).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtrain.engine.responses import layer_responses
from rtrain.tracking.mlflow import OUTBOX_DIR
from rtrain.tracking.run_info import RESPONSE_KEY

log = logging.getLogger("rtrain.tracking")
TAG_CHECKPOINT = "rtrain.checkpoint."  # + step-N: where that checkpoint is
TAG_LATEST_CHECKPOINT = "rtrain.checkpoint.latest"
TAG_EXPORT = "rtrain.model_export"


def checkpoint_uri(path: Path) -> str:
    return path.resolve().as_uri()


class TrackedCheckpoints:
    """A checkpointer that also records each published checkpoint on the MLflow run: `uri` sets the tag
    rtrain.checkpoint.step-N to its location, `upload` logs its files under checkpoints/step-N. Checkpoints
    are recorded once they are complete (async saves: at the next save or wait)."""

    def __init__(self, checkpointer: Any, tracker: Any, mode: str) -> None:
        self._inner = checkpointer
        self._tracker = tracker
        self._mode = mode
        self._recorded: set[str] = {p.name for p in checkpointer.list()}  # those of earlier starts

    def save(self, step: int, shared: dict, per_rank: dict | None = None, meta: dict | None = None) -> None:
        self._inner.save(step, shared, per_rank, meta)
        self._record_published()

    def wait(self) -> None:
        self._inner.wait()
        self._record_published()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _record_published(self) -> None:
        for path in reversed(self._inner.list()):  # oldest first
            if path.name in self._recorded:
                continue
            self._recorded.add(path.name)
            uri = checkpoint_uri(path)
            self._tracker.set_tags({TAG_CHECKPOINT + path.name: uri, TAG_LATEST_CHECKPOINT: uri})
            if self._mode == "upload" and "://" not in str(path):  # one in an object store is kept there
                self._tracker.log_artifact(path, f"checkpoints/{path.name}")


def track_checkpoints(checkpointer: Any, tracker: Any, mode: str, rank: int) -> Any:
    """The checkpointer to hand to the engine: rank 0 records checkpoints per tracking.log_checkpoints."""
    if rank != 0 or mode == "none" or getattr(tracker, "run_id", None) is None:
        return checkpointer
    return TrackedCheckpoints(checkpointer, tracker, mode)


def log_final_weights(tracker: Any, model: nn.Module, run_dir: Path) -> Path | None:
    """The final weights as model/<arch>.pt, in torchvision's layout where one exists (load with
    torchvision.models.<arch>(num_classes=N).load_state_dict); other nets (CIFAR, plain, option A/C, v1)
    as rtrain's own state dict model/state_dict.pt, with the reason in the rtrain.model_export tag."""
    if getattr(tracker, "run_id", None) is None:
        return None
    from rtrain.models.export import torchvision_arch, torchvision_state_dict
    from rtrain.models.weights import unwrap_model

    folder = run_dir / OUTBOX_DIR / "model"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        arch = torchvision_arch(model)
        path, state, note = folder / f"torchvision-{arch}.pt", torchvision_state_dict(model), f"torchvision {arch}"
    except ValueError as why:
        state = {k: v.detach().cpu().clone() for k, v in unwrap_model(model).state_dict().items()}
        path, note = folder / "state_dict.pt", f"rtrain state dict (no torchvision layout: {why})"
    torch.save(state, path)
    tracker.set_tags({TAG_EXPORT: note})
    tracker.log_artifact(path, "model")
    return path


class LayerResponseLog:
    """The engine's after_epoch hook on rank 0: layer responses of a fixed batch every `every_epochs`
    epochs and at the end, as layer_response/block_NNN metrics and layer_responses/step-N.png."""

    def __init__(self, tracker: Any, images: torch.Tensor, every_epochs: int, run_dir: Path) -> None:
        self.tracker = tracker
        self.images = images
        self.every_epochs = every_epochs
        self.folder = run_dir / OUTBOX_DIR / "layer_responses"
        self.done_steps: set[int] = set()

    def __call__(self, model: nn.Module, state: Any, final: bool) -> None:
        if state.step in self.done_steps or not (final or state.epoch % self.every_epochs == 0):
            return
        self.done_steps.add(state.step)
        stds = layer_responses(model, self.images)
        self.tracker.log_metrics({RESPONSE_KEY.format(i + 1): s for i, s in enumerate(stds)}, step=state.step)
        from rtrain.tracking.plots import layer_response_figure

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{state.step:09d}.png"
        layer_response_figure({f"step {state.step}": stds}, path)
        self.tracker.log_artifact(path, "layer_responses")


def layer_response_hook(recipe: Any, rank: int, tracker: Any, normalizer: Any) -> LayerResponseLog | None:
    """analysis.layer_responses on rank 0 (the other ranks have nothing to log): the first batch of the val
    split, in the eval transform, normalized on the training device."""
    config = recipe.analysis.layer_responses
    if config is None or rank != 0 or getattr(tracker, "run_id", None) is None:
        return None
    from rtrain.data import build_loader

    data = recipe.data.model_copy(update={"num_workers": 0})
    loader = build_loader(data, data.val_split, rank=0, world_size=1, batch_size=config.batch_size,
                          seed=recipe.run.seed, train=False)
    loader.set_epoch(0)
    images, _labels = next(iter(loader))
    return LayerResponseLog(tracker, normalizer(images), config.every_epochs, recipe.run_dir)
