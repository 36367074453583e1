"""Recipe fields reach the components they configure (the worker's wiring)."""

import pytest
import torch

from rtrain.config import Recipe
from rtrain.models.weights import export_torchvision
from rtrain.models import model_from_config
from rtrain.optim import LRSchedule, optimizer_from_config


def _recipe(*overrides: str) -> Recipe:
    return Recipe().with_overrides(list(overrides))


def model_from_recipe(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    return model_from_config(recipe.model, num_classes, seed=recipe.run.seed)


def schedule_from_recipe(recipe: Recipe, steps_per_epoch: int, total_steps: int) -> LRSchedule:
    return LRSchedule.from_config(recipe.schedule, recipe.peak_lr, steps_per_epoch, total_steps)


def test_schedule_epochs_become_steps():
    r = _recipe("schedule.warmup_epochs=0.5", "schedule.milestones_epochs=[1, 2]", "train.epochs=3")
    s = schedule_from_recipe(r, steps_per_epoch=10, total_steps=30)
    assert (s.warmup_steps, s.milestones, s.total_steps) == (5, (10, 20), 30)
    assert s.lr_at(5) == pytest.approx(0.1) and s.lr_at(10) == pytest.approx(0.01)
    r = _recipe("schedule.warmup_steps=7", "schedule.milestones_steps=[12]")
    assert schedule_from_recipe(r, 10, 30).milestones == (12,)


@pytest.mark.parametrize("name", ["sgd", "lars", "lamb", "adamw"])
def test_optimizer_from_recipe_excludes_bn_and_bias(name):
    r = _recipe(f"optim.name={name}", "model.name=cifar_resnet20", "train.global_batch=512")
    model = model_from_recipe(r, num_classes=10)
    opt = optimizer_from_config(model, r.optim, lr=r.peak_lr)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # 0.1 per 256 x 512
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays[0] == 0.0 and decays[-1] == pytest.approx(1e-4)


def test_model_from_recipe_options_and_same_init():
    r = _recipe("model.name=resnet18", "model.zero_init_residual=true", "model.stride_in=1x1")
    a, b = model_from_recipe(r, 7), model_from_recipe(r, 7)
    assert a.fc.out_features == 7
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert float(a.layer1[0].bn2.weight.abs().sum()) == 0.0


def test_init_from_torchvision_weights_with_a_new_head(tmp_path):
    source = model_from_recipe(_recipe("model.name=resnet18"), 1000)
    path = tmp_path / "tv.pt"
    torch.save(export_torchvision(source), path)
    r = _recipe("model.name=resnet18", f"model.init_from={path}", "run.seed=5", "model.init_from_skip=[fc]")
    tuned = model_from_recipe(r, 10)
    assert torch.equal(tuned.conv1.weight, source.conv1.weight)
    assert tuned.fc.out_features == 10
    same = model_from_recipe(_recipe("model.name=resnet18", f"model.init_from={path}"), 1000)
    assert torch.equal(same.fc.weight, source.fc.weight)


def test_init_from_is_strict_unless_told_what_to_leave_out(tmp_path):
    """A deeper net's file and another class count are refused in one line naming model.init_from and the
    file; nothing is dropped silently."""
    from rtrain.models.weights import InitFromError

    deeper = tmp_path / "resnet34.pt"
    torch.save(export_torchvision(model_from_recipe(_recipe("model.name=resnet34"), 1000)), deeper)
    with pytest.raises(InitFromError, match=rf"^model.init_from={deeper}: does not fit resnet18: \d+ tensor\(s\) of "
                                            r"the file have no place in resnet18 \(first: layer1.2"):
        model_from_recipe(_recipe("model.name=resnet18", f"model.init_from={deeper}"), 1000)
    with pytest.raises(InitFromError, match=r"fc.weight.*model.init_from_skip=\[fc\]"):
        model_from_recipe(_recipe("model.name=resnet34", f"model.init_from={deeper}"), 10)
    tuned = model_from_recipe(_recipe("model.name=resnet34", f"model.init_from={deeper}",
                                      "model.init_from_skip=[fc]"), 10)
    assert tuned.fc.out_features == 10
    shallow = tmp_path / "resnet18.pt"
    torch.save(export_torchvision(model_from_recipe(_recipe("model.name=resnet18"), 1000)), shallow)
    with pytest.raises(InitFromError, match=r"tensor\(s\) of resnet34 are not in the file \(first: layer1.2"):
        model_from_recipe(_recipe("model.name=resnet34", f"model.init_from={shallow}"), 1000)


def test_shipped_recipes_name_registered_models():
    from pathlib import Path

    from rtrain.config import load_recipe
    from rtrain.launch import check_model_name

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        check_model_name(load_recipe(path))
