"""Export to the real torchvision: every ImageNet ResNet loads strictly into torchvision's resnetNN and gives
the same logits; the backbone-only export loads strictly into resnet_fpn_backbone's body and gives the same
features; nets without a torchvision equivalent are refused by name."""

from __future__ import annotations

import pytest
import torch
from torchvision_peer import import_torchvision

from rtrain.models import build
from rtrain.models.export import torchvision_arch, torchvision_state_dict

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", pytest.param("resnet152", marks=pytest.mark.slow)]


def trained_like(name: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A model whose BN statistics and affine terms are not the identity, so a mis-mapped BN would show."""
    torch.manual_seed(seed)
    model = build(name, num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.num_batches_tracked.fill_(7)
    return model.eval()


def torchvision_resnet(arch: str, num_classes: int) -> torch.nn.Module:
    import_torchvision()
    from torchvision import models

    return getattr(models, arch)(weights=None, num_classes=num_classes)


def fpn_body(arch: str) -> torch.nn.Module:
    import_torchvision()
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=5).body


@pytest.mark.parametrize("name", IMAGENET)
def test_export_loads_strictly_into_torchvision_with_the_same_logits(name):
    model = trained_like(name)
    assert torchvision_arch(model) == name
    peer = torchvision_resnet(name, num_classes=10)
    peer.load_state_dict(torchvision_state_dict(model), strict=True)
    peer.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(peer(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_only_loads_strictly_into_the_fpn_body_with_the_same_features(name):
    model = trained_like(name)
    state = torchvision_state_dict(model, backbone_only=True)
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in state)
    body = fpn_body(name)
    assert list(state) == list(body.state_dict())  # exactly the body's keys, in its order
    body.load_state_dict(state, strict=True)
    body.eval()
    features = {}
    for index in range(1, 5):
        getattr(model, f"layer{index}").register_forward_hook(
            lambda module, args, out, key=str(index - 1): features.__setitem__(key, out))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(x)
        peer = body(x)
    assert list(peer) == ["0", "1", "2", "3"]
    for key, value in peer.items():  # FrozenBatchNorm2d folds its terms in another order: float rounding
        scale = features[key].abs().max().item()
        torch.testing.assert_close(value, features[key], rtol=1e-4, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("name, reason", [
    ("cifar_resnet20", "CIFAR ResNets have no torchvision equivalent"),
    ("plain34", "plain nets"),
])
def test_nets_without_a_torchvision_layout_are_refused_by_name(name, reason):
    with pytest.raises(ValueError, match=f"^{name}: no torchvision weight layout: {reason}"):
        torchvision_state_dict(build(name), backbone_only=True)


def test_paper_v1_bottleneck_is_refused():
    with pytest.raises(ValueError, match="^resnet50: .*stride_in='1x1', v1"):
        torchvision_arch(build("resnet50", stride_in="1x1"))
