"""`rtrain export CHECKPOINT_OR_RUN --format torchvision [--backbone-only] --out FILE`: a checkpoint's weights
as a state dict that torchvision loads with strict=True (rtrain.models.export holds the mapping)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from rtrain._io import write_atomically
from rtrain.commands.checkpoint_source import CommandError, load_checkpoint_model
from rtrain.models.export import torchvision_arch, torchvision_state_dict


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: folder {out.parent} does not exist")
    source = load_checkpoint_model(args.checkpoint)
    try:
        arch = torchvision_arch(source.model)
    except ValueError as exc:
        raise CommandError(f"cannot export to torchvision: {exc}") from None
    state = torchvision_state_dict(source.model, backbone_only=args.backbone_only)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(out, buffer.getvalue())
    classes = source.model.fc.out_features
    what = (f"the backbone of torchvision {arch} (no fc, no num_batches_tracked)" if args.backbone_only
            else f"torchvision {arch}(num_classes={classes})")
    print(f"wrote {out}: {len(state)} tensors, {what}, from {source.loaded.path} (step {source.loaded.step})")
    if args.backbone_only:
        print(f"load: resnet_fpn_backbone(backbone_name='{arch}', weights=None, trainable_layers=5)"
              f".body.load_state_dict(torch.load('{out}'))")
    else:
        print(f"load: torchvision.models.{arch}(num_classes={classes}).load_state_dict(torch.load('{out}'))")
    return 0
