"""Parameter and multiply-add counting, and the `rtrain models` table rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtrain.models import build, count_macs, count_params, list_models, model_info, model_rows


def conv_then_fc() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_count_params_by_hand():
    # conv 8*3*3*3 + BN 2*8 + fc 8*5+5; BN running stats are buffers, not parameters.
    assert count_params(conv_then_fc()) == 216 + 16 + 45


def test_count_params_counts_shared_parameters_once():
    layer = nn.Linear(4, 4)
    assert count_params(nn.Sequential(layer, layer)) == 20


@pytest.mark.parametrize(
    ("input_size", "batch", "macs"),
    [
        (10, 1, 8 * 10 * 10 * 27 + 40),
        ((10, 6), 2, 2 * (8 * 10 * 6 * 27 + 40)),
        ((3, 4, 4), 3, 3 * (8 * 16 * 27 + 40)),
    ],
)
def test_count_macs_by_hand(input_size, batch, macs):
    assert count_macs(conv_then_fc(), input_size, batch=batch) == macs


def test_count_macs_restores_training_mode_and_rejects_bad_size():
    model = conv_then_fc().train()
    count_macs(model, 8)
    assert model.training
    with pytest.raises(ValueError, match="input_size"):
        count_macs(model, (1, 2, 3, 4))


def test_meta_and_cpu_models_count_the_same():
    cpu = build("cifar_resnet20")
    with torch.device("meta"):
        meta = build("cifar_resnet20")
    assert count_macs(cpu, 32) == count_macs(meta, 32)
    assert count_params(cpu) == count_params(meta)


def test_model_rows_cover_every_model_with_consistent_figures():
    rows = model_rows()
    assert [r["name"] for r in rows] == list_models()
    assert all(set(r) == {"name", "params", "macs", "input_size"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet50"]["params"] == 25_557_032
    assert by_name["cifar_resnet1202"]["input_size"] == 32
    for name in ("resnet18", "resnet50", "cifar_resnet20", "cifar_plain56"):
        with torch.device("meta"):
            model = build(name)
        size = model_info(name).input_size
        assert by_name[name]["input_size"] == size
        assert by_name[name]["params"] == count_params(model)
        assert by_name[name]["macs"] == count_macs(model, size)
