"""Architecture facts of He et al. (2015): sizes, costs, shortcuts, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtrain.models import build, count_macs, count_params
from rtrain.models.blocks import ZeroPadShortcut


def meta_build(name: str, **options) -> nn.Module:
    with torch.device("meta"):
        return build(name, **options)


@pytest.mark.parametrize(
    ("depth", "millions", "digits"),
    [(20, 0.27, 2), (32, 0.46, 2), (44, 0.66, 2), (56, 0.85, 2), (110, 1.7, 1), (1202, 19.4, 1)],
)
def test_cifar_param_counts_match_paper_table(depth, millions, digits):
    assert round(count_params(meta_build(f"cifar_resnet{depth}")) / 1e6, digits) == millions


@pytest.mark.parametrize(
    ("depth", "params"),
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)],
)
def test_imagenet_option_b_v15_param_counts_exact(depth, params):
    assert count_params(meta_build(f"resnet{depth}")) == params


@pytest.mark.parametrize(
    ("depth", "giga_macs"), [(18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)]
)
def test_imagenet_v1_multiply_adds_match_paper(depth, giga_macs):
    macs = count_macs(meta_build(f"resnet{depth}", stride_in="1x1"), 224)
    assert macs == pytest.approx(giga_macs * 1e9, rel=0.03)


def test_v15_costs_more_than_v1_only_for_bottleneck_nets():
    for depth in (50, 101, 152):
        assert count_macs(meta_build(f"resnet{depth}"), 224) > count_macs(
            meta_build(f"resnet{depth}", stride_in="1x1"), 224
        )
    assert count_macs(meta_build("resnet34"), 224) == count_macs(
        meta_build("resnet34", stride_in="1x1"), 224
    )


def test_stride_in_places_the_stride():
    v15 = meta_build("resnet50").layer2[0]
    v1 = meta_build("resnet50", stride_in="1x1").layer2[0]
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))


@pytest.mark.parametrize(
    ("name", "size", "maps"),
    [
        ("resnet50", 224, [(256, 56), (512, 28), (1024, 14), (2048, 7)]),
        ("resnet18", 224, [(64, 56), (128, 28), (256, 14), (512, 7)]),
        ("cifar_resnet20", 32, [(16, 32), (32, 16), (64, 8)]),
    ],
)
def test_stage_output_shapes_follow_the_paper(name, size, maps):
    model = meta_build(name)
    x = torch.zeros(1, 3, size, size, device="meta")
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage, (channels, side) in zip(model.stages(), maps, strict=True):
        x = stage(x)
        assert tuple(x.shape) == (1, channels, side, side)


def shortcut_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".downsample." in n)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet34", "resnet50"])
def test_option_a_has_no_shortcut_parameters(name):
    model = meta_build(name, shortcut="A")
    assert shortcut_params(model) == 0
    assert any(isinstance(b.downsample, ZeroPadShortcut) for b in model.blocks())
    plain = meta_build(name.replace("resnet", "plain"))
    assert count_params(model) == count_params(plain)


def test_zero_pad_shortcut_subsamples_and_pads_with_zeros():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    y = ZeroPadShortcut(3, 7, stride=2)(x)
    assert y.shape == (2, 7, 3, 3)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2])
    assert not y[:, 3:].any()


def test_option_b_projects_only_where_dims_change_and_c_everywhere():
    option_b = meta_build("resnet50")
    option_c = meta_build("resnet50", shortcut="C")
    assert sum(b.downsample is not None for b in option_b.blocks()) == 4
    assert all(isinstance(b.downsample, nn.Sequential) for b in option_c.blocks())
    assert count_params(option_c) > count_params(option_b)
    cifar_b = meta_build("cifar_resnet20", shortcut="B")
    assert sum(b.downsample is not None for b in cifar_b.blocks()) == 2


@pytest.mark.parametrize("depth", [18, 50])
def test_plain_nets_have_no_shortcut_and_differ_only_by_projections(depth):
    resnet, plain = meta_build(f"resnet{depth}"), meta_build(f"plain{depth}")
    assert all(b.downsample is None and not b.residual for b in plain.blocks())
    assert count_params(resnet) - count_params(plain) == shortcut_params(resnet) > 0


def test_plain_block_does_not_add_its_input():
    torch.manual_seed(0)
    resnet, plain = build("cifar_resnet20"), build("cifar_plain20")
    plain.load_state_dict(resnet.state_dict())  # option A: identical parameter sets
    x = torch.randn(2, 16, 8, 8)
    res_block, plain_block = resnet.layer1[0].eval(), plain.layer1[0].eval()
    assert torch.allclose(
        res_block(x),
        torch.relu(
            plain_block.bn2(
                plain_block.conv2(plain_block.relu(plain_block.bn1(plain_block.conv1(x))))
            )
            + x
        ),
    )
    assert not torch.allclose(plain_block(x), res_block(x))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("cifar_resnet20", {}),
        ("resnet18", {}),
        ("resnet50", {"stride_in": "1x1"}),
        ("resnet18", {"shortcut": "C"}),
    ],
)
def test_zero_init_residual_makes_every_block_identity_before_relu(name, options):
    torch.manual_seed(0)
    model = build(name, zero_init_residual=True, **options)
    for block in model.blocks():
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        assert torch.equal(block(x), torch.relu(block.shortcut(x)))


def test_he_init_and_bn_init():
    torch.manual_seed(0)
    model = build("resnet18")
    conv = model.layer4[1].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert conv.bias is None
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    zero_init = build("resnet18", zero_init_residual=True)
    assert all(not b.bn2.weight.any() and b.bn1.weight.all() for b in zero_init.blocks())


@pytest.mark.parametrize("name", ["plain18", "cifar_plain20"])
def test_zero_init_residual_refused_for_plain_nets(name):
    build(name, zero_init_residual=False)  # accepted, so one recipe shape fits both kinds
    with pytest.raises(ValueError, match=f"{name}: zero_init_residual needs residual blocks"):
        build(name, zero_init_residual=True)


@pytest.mark.parametrize("depth", [21, 2, 0, "20", True])
def test_bad_cifar_depth_is_rejected(depth):
    with pytest.raises(ValueError, match="depth"):
        build("cifar_resnet", depth=depth)


def test_cifar_family_builder_matches_named_models():
    assert count_params(meta_build("cifar_resnet", depth=56)) == count_params(
        meta_build("cifar_resnet56")
    )
    assert len(meta_build("cifar_plain", depth=14).blocks()) == 6


@pytest.mark.slow
def test_resnet1202_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = build("cifar_resnet1202")
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1.weight.grad.abs().sum() > 0  # gradient reaches the first layer
