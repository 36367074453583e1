"""The pieces of `rtrain reproduce degradation` that need no launch: run-length overrides that keep the
recipes' schedule shape, one-line argument errors, and the table and figure from given curves. (The real
runs: tests/integration/test_reproduce_degradation.py.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtrain.commands.degradation_report import Curves, error_table, plot_error_curves
from rtrain.commands.reproduce import NETS, ReproduceError, plan_from_args, schedule_overrides
from rtrain.config import load_recipe
from rtrain.optim import LRSchedule

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "degradation"


@pytest.mark.parametrize("epochs", [1, 2, 3, 30, 60])
def test_other_run_lengths_keep_the_warm_start_and_the_late_decay(epochs):
    recipe = load_recipe(RECIPES / "resnet56.yaml", schedule_overrides(epochs))
    schedule = LRSchedule.from_config(recipe.schedule, recipe.peak_lr, steps_per_epoch=20,
                                      total_steps=20 * epochs)
    warm = schedule.warmup_steps
    assert warm == round(20 * min(2, epochs / 4))
    assert schedule.lr_at(0) == pytest.approx(0.01) and schedule.lr_at(warm) == pytest.approx(0.1)
    assert schedule.milestones == (round(20 * 0.75 * epochs),)
    assert schedule.lr_at(20 * epochs - 1) == pytest.approx(0.01)


def test_the_recipes_own_length_needs_no_overrides():
    assert schedule_overrides(None) == []
    assert load_recipe(RECIPES / "plain56.yaml").train.epochs == 30


def _args(**given) -> argparse.Namespace:
    values = {"out": None, "epochs": None, "quick": False, "data": None, "recipes": str(RECIPES), **given}
    return argparse.Namespace(**values)


def test_plan_defaults_and_quick_set(tmp_path):
    full = plan_from_args(_args(out=str(tmp_path)))
    assert full.nets == NETS and full.epochs is None and full.data == tmp_path / "shards" and full.prepare_data
    quick = plan_from_args(_args(quick=True, data=str(tmp_path / "d")))
    assert quick.nets == ("plain20", "resnet20") and quick.epochs == 2 and not quick.prepare_data
    assert quick.out.name == "degradation-quick"
    assert f"tracking.uri=sqlite:///{full.out}/mlflow.db" in full.overrides("plain56")


@pytest.mark.parametrize("given, message", [
    ({"epochs": 0}, "--epochs must be at least 1, got 0"),
    ({"recipes": "/nonexistent/recipes"},
     "--recipes /nonexistent/recipes: no recipe /nonexistent/recipes/plain20.yaml"),
])
def test_bad_arguments_are_one_line_naming_the_option(given, message):
    with pytest.raises(ReproduceError) as caught:
        plan_from_args(_args(**given))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def _curves(net: str, final_train: float) -> Curves:
    epochs = range(1, 11)
    return Curves(net, f"run-{net}", [(e, 90 / e + final_train) for e in epochs],
                  [(e, 80 / e + final_train + 2) for e in epochs])


def test_table_and_figure_from_curves(tmp_path):
    curves = [_curves("plain20", 5.0), _curves("plain56", 13.9), _curves("resnet20", 3.0), _curves("resnet56", 0.2)]
    table = error_table(curves)
    assert "| plain-56 | 56 | none | 22.90 % | 23.90 % | 10 | `run-plain56` |" in table
    assert "plain-56 minus plain-20, final training error: +8.90 points (the paper: higher" in table
    assert "ResNet-56 minus ResNet-20, final training error: -2.80 points (the paper: lower" in table
    plot_error_curves(curves, tmp_path / "fig.png")
    pixels = np.asarray(Image.open(tmp_path / "fig.png").convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7].astype(int)}
    assert len(colours) > 20  # four net colours, antialiased, beside the black and grey of axes and text
