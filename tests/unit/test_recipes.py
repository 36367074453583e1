"""Every recipe on disk validates as shipped and says in its opening comment what it is for and where its
numbers come from; the four degradation recipes differ only in the net. (Running each recipe for a few steps
at CPU scale: tests/integration/test_recipes_run.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rtrain.config import load_recipe
from rtrain.models.registry import model_info

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
SOURCES = ("He et al.", "Goyal et al.", "You et al.", "MLPerf", "NVIDIA")


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


def test_the_shipped_recipes_are_found():
    names = {_id(p) for p in RECIPES}
    assert {"quickstart.yaml", "r50_paper.yaml", "r50_lars.yaml", "r152_256gpu.yaml", "r1202_cifar.yaml",
            "degradation/plain20.yaml", "degradation/resnet56.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_validates_and_its_opening_comment_names_its_source(path):
    recipe = load_recipe(path)
    model_info(recipe.model.name)  # a registered model
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{_id(path)}: no opening comment saying what the recipe is for"
    assert any(source in " ".join(header) for source in SOURCES), \
        f"{_id(path)}: the opening comment names none of {SOURCES}"


def test_degradation_recipes_differ_only_in_the_net():
    folder = REPO / "recipes" / "degradation"
    raw = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))}
    assert sorted(raw) == ["plain20", "plain56", "resnet20", "resnet56"]
    for name, tree in raw.items():
        assert tree["run"]["name"] == name
        assert tree["model"]["name"] == f"cifar_{name}"
        assert tree["model"].get("shortcut") == ("A" if name.startswith("resnet") else None)
    common = [{k: v for k, v in tree.items() if k not in ("run", "model")} for tree in raw.values()]
    assert all(c == common[0] for c in common)
    schedule = load_recipe(folder / "resnet56.yaml").schedule
    assert (schedule.warmup_shape, schedule.warmup_start_lr, schedule.warmup_epochs) == ("constant", 0.01, 2)
