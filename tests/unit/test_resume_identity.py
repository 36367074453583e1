"""rtrain.launch.identity reads a checkpoint's recipe text, which anyone who could write the checkpoint wrote:
aliases (a billion laughs), odd scalars, deep nesting and huge texts are "cannot tell", in bounded time."""

from __future__ import annotations

import time

import pytest

from rtrain.launch.identity import _identity

LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
    for i in range(8))


@pytest.mark.parametrize("text", [LAUGHS, "model: {name: 2020-02-30}", "a: !!int 0x", "[" * 5000,
                                  "a: " + "9" * 5000, "x: 1\n" * 300000, "- just\n- a list\n"])
def test_a_hostile_recipe_text_is_unknown_not_a_crash(text: str) -> None:
    began = time.monotonic()
    found = _identity(text)
    assert isinstance(found, dict) and time.monotonic() - began < 10
    assert "model.name" not in found or found["model.name"] == "2020-02-30"


def test_a_real_recipe_text_gives_its_identity() -> None:
    from rtrain.config import load_recipe

    recipe = load_recipe("recipes/quickstart.yaml", ["model.name=cifar_plain20"])
    found = _identity(recipe.to_yaml())
    assert found["model.name"] == "cifar_plain20" and found["optim.name"] == recipe.optim.name
