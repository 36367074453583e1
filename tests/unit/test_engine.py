"""The train step and loop on one process: precision paths, loss scaling, non-finite handling, accumulation,
EMA and resume through the real checkpoint manager. The loader here is a small in-memory one with the
ShardLoader interface; the real loader is exercised by tests/distributed and tests/integration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtrain.checkpoint import CheckpointManager
from rtrain.config import PrecisionConfig, Recipe
from rtrain.distributed.backend import DDPBackend
from rtrain.engine.ema import ModelEMA
from rtrain.engine.evaluate import evaluate, ten_crops
from rtrain.engine.loop import FitParts, NonFiniteLossError, fit, restore
from rtrain.distributed.scaler import build_scaler
from rtrain.engine.step import Normalizer, TrainStep
from rtrain.optim.schedule import LRSchedule

CPU = torch.device("cpu")


class MemoryLoader:
    """Fixed uint8 batches; position = batches yielded in the current epoch (what a checkpoint needs)."""

    def __init__(self, batches: int = 6, batch: int = 8, size: int = 8, classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batches, batch, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (batches, batch), generator=g)
        self.epoch, self.position = 0, 0
        self.stats = {"skipped_samples": 0}
        self.classes = {str(i): i for i in range(classes)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.epoch))
        while self.position < len(self.images):
            i = order[self.position]
            self.position += 1
            yield self.images[i], self.labels[i]

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def tiny_model(classes: int = 3, bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)]
    return nn.Sequential(*layers)


def make_step(model, precision=PrecisionConfig(), accumulation=1, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    backend = DDPBackend(model, opt, build_scaler(precision, CPU), device=CPU)
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), CPU)
    return TrainStep(backend, norm, precision, accumulation_steps=accumulation), backend, norm


def test_normalizer_matches_reference():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    norm = Normalizer((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), CPU, channels_last=True)
    out = norm(x)
    ref = (x.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_fp16_overflow_skips_the_step_and_backs_off():
    precision = PrecisionConfig(dtype="fp16", scaler="dynamic", init_scale=1024.0)
    model = tiny_model()
    step, backend, _ = make_step(model, precision)
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (8,))
    with torch.no_grad():
        model[-1].weight[0, 0] = float("inf")  # inf logits -> non-finite loss and gradients
    before = [p.detach().clone() for p in model.parameters()]
    result = step(x, y)
    assert result.found_inf and not result.stepped
    assert backend.loss_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bf16_autocast_path_trains():
    step, backend, _ = make_step(tiny_model(), PrecisionConfig(dtype="bf16"))
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (8,))
    losses = [float(step(x, y).loss) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_static_scaler_keeps_its_scale_after_overflow():
    precision = PrecisionConfig(dtype="fp16", scaler="static", static_scale=64.0)
    model = tiny_model()
    step, backend, _ = make_step(model, precision)
    with torch.no_grad():
        model[-1].weight[0, 0] = float("inf")
    assert step(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)).found_inf
    assert backend.loss_scale() == 64.0


def test_accumulation_matches_one_big_batch_without_bn():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (8,))
    m1, m2 = tiny_model(bn=False), tiny_model(bn=False)
    s1, _, _ = make_step(m1, accumulation=1)
    s2, _, _ = make_step(m2, accumulation=4)
    for _ in range(3):
        s1(x, y), s2(x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def _parts(tmp_path, recipe: Recipe, total_steps: int, model=None, loader=None, ema=False) -> FitParts:
    model = model or tiny_model()
    step, backend, norm = make_step(model)
    loader = loader or MemoryLoader()
    eval_loader = MemoryLoader(batches=2, seed=1)

    def run_eval(m):
        eval_loader.set_epoch(0)
        return evaluate(m, eval_loader, norm, recipe.precision, mode="center")

    return FitParts(train=recipe.train, precision=recipe.precision, evaluation=recipe.eval,
                    checkpoint=recipe.checkpoint, backend=backend, train_step=step, train_loader=loader,
                    evaluate=run_eval, schedule=LRSchedule("cosine", 0.1, total_steps, warmup_steps=2),
                    total_steps=total_steps, steps_per_epoch=len(loader),
                    checkpointer=CheckpointManager(tmp_path / "ckpt", keep=10),
                    ema=ModelEMA(model, 0.9) if ema else None)


def _recipe(**train) -> Recipe:
    return Recipe().with_overrides([f"train.{k}={v}" for k, v in train.items()]
                                   + ["train.global_batch=8", "checkpoint.every_steps=4"])


def test_fit_runs_evaluates_and_checkpoints(tmp_path):
    parts = _parts(tmp_path, _recipe(epochs=2, log_every_steps=5), total_steps=12, ema=True)
    summary = fit(parts)
    assert summary["step"] == 12 and summary["epoch"] == 2 and summary["samples_seen"] == 96
    assert 0.0 <= summary["val_top1"] <= 1.0
    steps = sorted(int(p.name.split("-")[1]) for p in parts.checkpointer.list())
    assert steps == [4, 8, 12]  # every_steps=4 (no per-epoch saves then), and the end


def test_resume_is_bit_identical(tmp_path):
    straight = _parts(tmp_path / "a", _recipe(epochs=2), total_steps=12, ema=True)
    fit(straight)
    first = _parts(tmp_path / "b", _recipe(epochs=2), total_steps=12, ema=True)
    first.total_steps = 5  # stop mid-epoch 0... the schedule still spans 12 steps
    fit(first)
    again = _parts(tmp_path / "b", _recipe(epochs=2), total_steps=12, ema=True)
    loaded = again.checkpointer.latest()
    assert loaded.step == 5
    restore(again, loaded.shared, loaded.per_rank)
    fit(again)
    for a, b in zip(straight.backend.module.state_dict().values(), again.backend.module.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.module.parameters(), again.ema.module.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_losses_stop_the_run_with_checkpoints_intact(tmp_path):
    model = tiny_model()
    parts = _parts(tmp_path, _recipe(epochs=3, max_nonfinite_steps=3), total_steps=18, model=model)
    parts.total_steps = 4
    fit(parts)  # a good checkpoint at step 4
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[-1].bias.fill_(float("nan"))
    parts.total_steps = 18
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        fit(parts)
    loaded = parts.checkpointer.latest()
    assert loaded.step == 4
    assert all(torch.equal(loaded.shared["model"][k], v) for k, v in good.items())


def test_ten_crops_shapes_and_mirrors():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    crops = ten_crops(x, 4)
    assert len(crops) == 10 and all(c.shape == (2, 3, 4, 4) for c in crops)
    assert torch.equal(crops[5], crops[0].flip(-1))
    assert torch.equal(crops[4], x[..., 1:5, 1:5])


@pytest.mark.slow
def test_torch_compile_matches_eager_and_saves_plain_keys():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 3, (8,))
    losses = []
    for compiled in (False, True):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        backend = DDPBackend(model, opt, build_scaler(PrecisionConfig(), CPU), device=CPU,
                             compile_model=compiled)
        step = TrainStep(backend, Normalizer((0.5,) * 3, (0.25,) * 3, CPU), PrecisionConfig())
        losses.append([float(step(x, y).loss) for _ in range(3)])
        assert all(not k.startswith("_orig_mod") for k in backend.state_dict()["shared"]["model"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


class RecordingTracker:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def state_dict(self):
        return {"version": 1, "run_id": None}


def test_training_error_is_logged_with_each_logged_step_over_its_window(tmp_path):
    parts = _parts(tmp_path, _recipe(epochs=3, log_every_steps=5), total_steps=15)
    parts.tracker = RecordingTracker()
    fit(parts)
    errors = [(step, m["train/top1_error"], m["train/top5_error"]) for step, m in parts.tracker.logged
              if "train/top1_error" in m]
    assert [step for step, _, _ in errors] == [5, 10, 15]
    assert all(0.0 <= top5 <= top1 <= 1.0 for _, top1, top5 in errors)


def test_step_counts_top1_hits_of_the_batch_as_trained():
    import copy

    model, loader = tiny_model(), MemoryLoader()
    reference = copy.deepcopy(model)  # the step's forward sees the weights before its update
    step, _, norm = make_step(model, accumulation=2)
    images, labels = loader.images[0], loader.labels[0]
    hits = sum(int((reference(norm(x)).argmax(1) == y).sum())
               for x, y in zip(images.chunk(2), labels.chunk(2)))
    result = step(images, labels)
    assert result.hits[0].item() == hits and result.hits[2].item() == len(labels)
