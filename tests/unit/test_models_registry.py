"""The model registry: every model builds and runs; bad names and options fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtrain.models import ModelInfo, ModelRegistry, build, list_models, model_info

# Small inputs keep the sweep fast; every net still reaches a >= 1x1 map before pooling.
TINY_INPUT = {"imagenet": 64, "cifar": 16}
SLOW_MODELS = {"cifar_resnet1202"}


def sweep_params():
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW_MODELS else name
        for name in list_models()
    ]


@pytest.mark.parametrize("name", sweep_params())
def test_every_registered_model_builds_and_classifies_a_tiny_batch(name):
    info = model_info(name)
    torch.manual_seed(0)
    model = build(name)
    size = TINY_INPUT[info.family]
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "plain34", "cifar_resnet20", "cifar_plain20"])
def test_num_classes_option_sets_the_head(name):
    model = build(name, num_classes=7)
    size = TINY_INPUT[model_info(name).family]
    assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_registry_lists_the_paper_zoo():
    names = set(list_models())
    expected = {f"{k}{d}" for k in ("resnet", "plain") for d in (18, 34, 50, 101, 152)}
    expected |= {f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202)}
    expected |= {f"cifar_plain{d}" for d in (20, 32, 44, 56, 110)}
    assert names == expected
    assert set(list_models(include_generic=True)) == expected | {"cifar_resnet", "cifar_plain"}


@pytest.mark.parametrize(
    ("name", "family", "size", "classes"),
    [
        ("resnet50", "imagenet", 224, 1000),
        ("plain152", "imagenet", 224, 1000),
        ("cifar_resnet110", "cifar", 32, 10),
        ("cifar_plain", "cifar", 32, 10),
    ],
)
def test_model_info(name, family, size, classes):
    info = model_info(name)
    assert (info.family, info.input_size, info.num_classes) == (family, size, classes)
    assert info.as_dict()["name"] == name


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet51'.*resnet50.*cifar_resnet1202"):
        build("resnet51")
    with pytest.raises(ValueError, match="unknown model"):
        model_info("vgg16")


def test_unknown_option_names_model_option_and_valid_ones():
    with pytest.raises(ValueError, match=r"'resnet50' has no option\(s\) 'shortcutt'.*shortcut, "):
        build("resnet50", shortcutt="A")
    # Options that do not apply to a net are unknown to it.
    with pytest.raises(ValueError, match=r"'plain18' has no option\(s\) 'shortcut'.*stride_in"):
        build("plain18", shortcut="B")
    with pytest.raises(ValueError, match=r"'cifar_resnet20' has no option\(s\) 'stride_in'"):
        build("cifar_resnet20", stride_in="1x1")


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("resnet18", {"shortcut": "D"}, "resnet18: shortcut='D' is not one of A, B, C"),
        ("resnet50", {"stride_in": "2x2"}, "resnet50: stride_in='2x2'"),
        ("cifar_resnet20", {"num_classes": 0}, "cifar_resnet20: num_classes=0"),
        ("cifar_resnet", {}, "'cifar_resnet' needs option.*depth"),
    ],
)
def test_bad_option_values_rejected(name, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        build(name, **options)


def test_custom_registry_register_and_duplicates():
    registry = ModelRegistry()
    info = ModelInfo("tiny", "cifar", 32, 3, options=("width",))
    registry.register(info, lambda width=4: nn.Sequential(nn.Flatten(), nn.LazyLinear(width)))
    assert registry.list_models() == ["tiny"]
    assert registry.build("tiny", width=3)(torch.zeros(1, 3, 2, 2)).shape == (1, 3)
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        registry.register(info, lambda: nn.Identity())
    with pytest.raises(ValueError, match="family"):
        ModelInfo("bad", "mnist", 28, 10, options=())
