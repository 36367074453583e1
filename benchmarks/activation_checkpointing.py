"""What per-stage activation checkpointing (checkpoint_stages) saves and costs, on CPU.

    python -m benchmarks.activation_checkpointing [--model resnet50] [--size 64] [--batch 4]
        [--repeats 5]

For each variant (no checkpointing = the baseline, then every stage checkpointed), in this run:
  saved MB   bytes of the activations kept for backward after the forward pass (exact: tensors
             seen by saved_tensors_hooks plus the inputs checkpointed stages keep; each storage
             counted once; parameters excluded)
  step s     median wall time of forward + backward (train mode), alternating the variants
and the ratios against the baseline. Both variants start from the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from rtrain.models import build


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of activations kept for backward after model(x), counting each storage once."""
    storages: dict[int, int] = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    # A checkpointed stage keeps its input outside autograd's saved-tensor hooks: record it here.
    hooks = [
        stage.register_forward_pre_hook(lambda _module, args: remember(args[0]))
        for number, stage in enumerate(model.stages(), start=1)
        if number in model.checkpointed_stages
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(remember, lambda t: t):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    # Parameters are saved for backward too but exist anyway; count only activations.
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in param_ptrs)


def step_seconds(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    start = time.perf_counter()
    nn.functional.cross_entropy(model(x), target).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    baseline = build(args.model)
    checkpointed = build(args.model, checkpoint_stages=True)
    checkpointed.load_state_dict(baseline.state_dict())
    variants = {"none": baseline, "all stages": checkpointed}
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))
    saved = {name: saved_activation_bytes(model, x) for name, model in variants.items()}
    for model in variants.values():
        step_seconds(model, x, target)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, model in variants.items():
            times[name].append(step_seconds(model, x, target))
    threads = torch.get_num_threads()
    print(f"{args.model}, batch {args.batch} at {args.size}px, torch threads {threads}")
    for name in variants:
        step = statistics.median(times[name])
        print(
            f"{name:>10}: saved {saved[name] / 2**20:8.1f} MB ({saved[name] / saved['none']:.3f}x)"
            f"  step {step:6.3f} s ({step / statistics.median(times['none']):.3f}x)"
        )


if __name__ == "__main__":
    main()
