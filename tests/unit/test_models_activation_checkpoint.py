"""Per-stage activation checkpointing: same math, fewer saved activations, exact BN stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rtrain.models import build


def saved_tensor_count(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward pass, counting the tensors autograd keeps for backward."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, count


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    out, saved = saved_tensor_count(model, x)
    nn.functional.cross_entropy(out, target).backward()
    return out, saved


@pytest.mark.parametrize(
    ("name", "stages", "size"),
    [("cifar_resnet20", True, 8), ("resnet18", [2, 4], 32), ("resnet50", [1], 32)],
)
def test_checkpointing_gives_same_outputs_grads_and_bn_stats(name, stages, size):
    torch.manual_seed(0)
    reference = build(name, num_classes=5)
    checkpointed = build(name, num_classes=5, checkpoint_stages=stages)
    checkpointed.load_state_dict(reference.state_dict())
    x, target = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])

    out_ref, saved_ref = train_step(reference, x, target)
    out_ckpt, saved_ckpt = train_step(checkpointed, x, target)

    assert saved_ckpt < saved_ref  # checkpointing really happened
    assert torch.equal(out_ref, out_ckpt)
    for (param_name, p_ref), p_ckpt in zip(
        reference.named_parameters(), checkpointed.parameters(), strict=True
    ):
        assert torch.equal(p_ref.grad, p_ckpt.grad), param_name
    # The recomputation in backward must not update BN running stats a second time.
    for (key, ref_value), ckpt_value in zip(
        reference.state_dict().items(), checkpointed.state_dict().values(), strict=True
    ):
        assert torch.equal(ref_value, ckpt_value), key


def test_checkpointing_is_inactive_in_eval_and_without_grad():
    torch.manual_seed(0)
    model = build("cifar_resnet20", checkpoint_stages=True)
    plain_model = build("cifar_resnet20")
    plain_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    plain_model.eval()
    out, saved = saved_tensor_count(model, x)
    _, saved_plain = saved_tensor_count(plain_model, x)
    assert saved == saved_plain
    with torch.no_grad():
        assert torch.equal(model(x), plain_model(x))


@pytest.mark.parametrize("stages", [[0], [4], ["1"], "1", 2.0, [True]])
def test_bad_checkpoint_stages_rejected_with_valid_range(stages):
    with pytest.raises(ValueError, match=r"cifar_resnet20: checkpoint_stages.*\[1, 2, 3\]"):
        build("cifar_resnet20", checkpoint_stages=stages)
