"""torchvision state-dict interchange (torchvision is not installed; its layout facts are)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rtrain.models import build, export_torchvision, import_torchvision
from rtrain.models.weights import torchvision_keys


def trained_like(name: str, seed: int, **options) -> nn.Module:
    """A model whose weights and BN running stats all differ from a fresh build (same scale)."""
    torch.manual_seed(seed)
    model = build(name, **options)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(torch.empty_like(tensor).uniform_(0.5, 1.5))
                tensor.add_(0.01 * torch.randn_like(tensor))
            else:
                tensor.fill_(seed + 3)
        for name_, buffer in model.named_buffers():
            if name_.endswith("running_var"):
                buffer.abs_()
    return model.eval()


@pytest.mark.parametrize(("name", "entries"), [("resnet18", 122), ("resnet50", 320)])
def test_export_has_torchvision_key_count(name, entries):
    model = build(name)
    exported = export_torchvision(model)
    assert len(exported) == entries == len(torchvision_keys(model.spec))
    assert list(exported) == torchvision_keys(model.spec)


def test_export_shapes_of_known_torchvision_keys():
    exported = export_torchvision(build("resnet50"))
    assert exported["conv1.weight"].shape == (64, 3, 7, 7)
    assert exported["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert exported["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert exported["layer4.2.bn3.running_var"].shape == (2048,)
    assert exported["fc.weight"].shape == (1000, 2048)
    assert "layer1.0.downsample.0.weight" not in export_torchvision(build("resnet18"))


@pytest.mark.parametrize(("name", "size"), [("resnet18", 32), ("resnet50", 32)])
def test_round_trip_is_exact(name, size):
    source, target = trained_like(name, seed=1), trained_like(name, seed=2)
    x = torch.randn(2, 3, size, size)
    assert not torch.equal(source(x), target(x))
    report = import_torchvision(target, export_torchvision(source))
    assert report.missing_keys == [] and report.unexpected_keys == []
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    out = source(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, target(x))


def test_compiled_model_prefixes_and_unwrapping():
    source, target = trained_like("resnet18", seed=1), trained_like("resnet18", seed=2)
    compiled = torch.compile(source)  # lazily compiled: only the wrapper is created
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    import_torchvision(target, compiled.state_dict())
    assert torch.equal(target.fc.weight, source.fc.weight)
    exported = export_torchvision(compiled)
    assert torch.equal(exported["layer3.1.bn2.running_mean"], source.layer3[1].bn2.running_mean)


def test_ddp_prefixed_state_dict_and_ddp_wrapped_model():
    source, target = trained_like("resnet18", seed=1), trained_like("resnet18", seed=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped_source = nn.parallel.DistributedDataParallel(source)
        state = wrapped_source.state_dict()
        assert all(k.startswith("module.") for k in state)
        wrapped_target = nn.parallel.DistributedDataParallel(target)
        import_torchvision(wrapped_target, state)
        assert list(export_torchvision(wrapped_source)) == torchvision_keys(source.spec)
    finally:
        dist.destroy_process_group()
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    # Stacked wrappers: DDP around a compiled model.
    stacked = {f"module._orig_mod.{k}": v for k, v in export_torchvision(source).items()}
    import_torchvision(trained_like("resnet18", seed=3), stacked)


def test_missing_and_unexpected_keys_are_named():
    model = build("resnet18")
    state = export_torchvision(build("resnet18"))
    del state["layer2.0.downsample.0.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys: layer2.0.downsample.0.weight") as raised:
        import_torchvision(model, state)
    assert "unexpected keys: layer5.0.conv1.weight" in str(raised.value)


def test_non_strict_reports_and_loads_the_rest():
    source, target = trained_like("resnet18", seed=1), trained_like("resnet18", seed=2)
    state = export_torchvision(source)
    before = target.fc.weight.clone()
    del state["fc.weight"]
    state["extra.head"] = torch.zeros(3)
    report = import_torchvision(target, state, strict=False)
    assert report.missing_keys == ["fc.weight"] and report.unexpected_keys == ["extra.head"]
    assert torch.equal(target.fc.weight, before)
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_shape_mismatch_names_the_key_even_when_not_strict():
    state = export_torchvision(build("resnet18"))
    with pytest.raises(
        ValueError, match=r"fc.weight: checkpoint \(1000, 512\) vs model \(10, 512\)"
    ):
        import_torchvision(build("resnet18", num_classes=10), state, strict=False)


def test_old_checkpoints_without_num_batches_tracked_load():
    source, target = trained_like("resnet50", seed=1), trained_like("resnet50", seed=2)
    state = {k: v for k, v in export_torchvision(source).items() if "num_batches_tracked" not in k}
    assert len(state) == 320 - 53  # one per BN layer
    import_torchvision(target, state)
    assert torch.equal(target.layer3[5].bn3.running_var, source.layer3[5].bn3.running_var)
    assert target.bn1.num_batches_tracked.item() == 0


def test_non_tensor_entries_are_named():
    state = dict(export_torchvision(build("resnet18")))
    state["fc.bias"] = [0.0] * 1000
    with pytest.raises(ValueError, match="not tensors: fc.bias"):
        import_torchvision(build("resnet18"), state)


@pytest.mark.parametrize(
    ("name", "options", "reason"),
    [
        ("resnet34", {"shortcut": "A"}, "option A"),
        ("resnet50", {"shortcut": "C"}, "option C"),
        ("plain18", {}, "plain nets"),
        ("cifar_resnet20", {}, "CIFAR"),
        ("resnet50", {"stride_in": "1x1"}, "stride_in='1x1'"),
    ],
)
def test_nets_without_torchvision_equivalent_are_refused(name, options, reason):
    model = build(name, **options)
    with pytest.raises(ValueError, match=f"no torchvision weight layout.*{reason}"):
        export_torchvision(model)
    with pytest.raises(ValueError, match="no torchvision weight layout"):
        import_torchvision(model, export_torchvision(build("resnet18")))


def test_basic_block_nets_ignore_stride_in_for_interchange():
    # Basic blocks have no 1x1 conv to stride: stride_in="1x1" ResNet-18 is torchvision's ResNet-18.
    source = trained_like("resnet18", seed=1)
    target = trained_like("resnet18", seed=2, stride_in="1x1")
    import_torchvision(target, export_torchvision(source))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(source(x), target(x))
