"""`rtrain eval` and `rtrain export` in-process on checkpoints written by the real CheckpointManager: which
checkpoint a path names (step folder, run directory, checkpoint folder, a damaged newest one), the printed
report, the exported file, and expected failures as one `rtrain: ...` line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_loader_fixtures import write_split
from torchvision_peer import import_torchvision

from rtrain.checkpoint import CheckpointManager
from rtrain.cli import main
from rtrain.config import recipe_from_dict
from rtrain.models import model_from_config


def write_checkpoints(root: Path, model_name: str, steps: list[int], *, checkpoint_dir: Path | None = None,
                      resolved_recipe: bool = False) -> Path:
    """A run directory `root/run` whose checkpoints hold models built from a recipe, one seed per step."""
    raw = {"run": {"name": "run", "output_root": str(root)},
           "model": {"name": model_name, "num_classes": 5},
           "data": {"source": str(root / "shards"), "image_size": 16, "eval_resize": 18, "num_workers": 0,
                    "augment": "none"},
           "train": {"global_batch": 4}, "tracking": {"enabled": False},
           "checkpoint": {"dir": str(checkpoint_dir) if checkpoint_dir else None}}
    recipe = recipe_from_dict(raw)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    if resolved_recipe:
        (recipe.run_dir / "resolved_recipe.yaml").write_text(recipe.to_yaml())
    with CheckpointManager(recipe.checkpoint_dir, keep=None) as manager:
        for step in steps:
            model = model_from_config(recipe.model, 5, seed=step)
            header = {"version": 1, "shared": ["model"], "per_rank": []}
            manager.save(step, {"model": model.state_dict(), "backend": header}, meta={"recipe_yaml": recipe.to_yaml()})
    return recipe.run_dir


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    write_split(tmp_path / "shards", "val", [6, 5], num_classes=5)
    return tmp_path / "shards"


def run_cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def report_of(lines: list[str]) -> dict:
    return json.loads(lines[-1])


@pytest.mark.parametrize("mode", ["center", "ten_crop", "multi_scale"])
def test_eval_of_a_run_directory_uses_its_newest_checkpoint(tmp_path, shards, capsys, mode):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1, 2])
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", mode, "--scales", "16,24", "--batch-size", "4")
    assert code == 0, err
    report = report_of(out)
    assert report["step"] == 2 and report["checkpoint"] == str(run / "checkpoints" / "step-000000002")
    assert report["images"] == 11 and report["mode"] == mode and report["model"] == "cifar_resnet20"
    assert 0 <= report["top1_error"] <= 1 and 0 <= report["top5_error"] <= report["top1_error"]
    assert out[3] == f"top-1 error  {100 * report['top1_error']:.2f} %"
    assert out[4] == f"top-5 error  {100 * report['top5_error']:.2f} %"


def test_eval_limit_and_explicit_data_and_step_folder(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path / "elsewhere", "cifar_resnet20", [3])
    code, out, _ = run_cli(capsys, "eval", str(run / "checkpoints" / "step-000000003"), "--data", str(shards),
                           "--limit", "5")
    assert code == 0 and report_of(out)["images"] == 5 and report_of(out)["data"] == f"{shards}/val"


def test_run_directory_honours_checkpoint_dir_of_its_resolved_recipe(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [4], checkpoint_dir=tmp_path / "ckpts",
                            resolved_recipe=True)
    code, out, _ = run_cli(capsys, "eval", str(run), "--limit", "2")
    assert code == 0 and report_of(out)["checkpoint"] == str(tmp_path / "ckpts" / "step-000000004")


def test_damaged_newest_checkpoint_falls_back_but_named_directly_fails(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1, 2])
    damaged = run / "checkpoints" / "step-000000002"
    model_file = damaged / "shared" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "eval", str(run), "--limit", "2")
    assert code == 0 and report_of(out)["step"] == 1
    code, out, err = run_cli(capsys, "eval", str(damaged))
    assert (code, out) == (2, [])
    assert err == [f"rtrain: {damaged}: file shared/model.pt fails its sha256 check (corrupted)"]


@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "torchvision", "--out", "{tmp}/x.pt"]])
def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, command):
    argv = [part.format(tmp=tmp_path) for part in command]
    code, out, err = run_cli(capsys, argv[0], str(tmp_path / "nope"), *argv[1:])
    assert (code, out, err) == (2, [], [f"rtrain: {tmp_path / 'nope'}: no such checkpoint or run directory"])
    assert not (tmp_path / "nope").exists()


def test_folder_without_checkpoints_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and err == [f"rtrain: {tmp_path}: not a checkpoint (step-N/) and no checkpoints under "
                                 f"{tmp_path / 'checkpoints'}"]
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_is_one_line(tmp_path, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1])
    code, _, err = run_cli(capsys, "eval", str(run), "--data", str(tmp_path / "nodata"))
    assert code == 2
    assert err == [f"rtrain: data: {tmp_path / 'nodata'}/val/manifest.json: manifest not found (split 'val')"]


def test_export_writes_what_torchvision_loads_strictly(tmp_path, capsys):
    import_torchvision()
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    run = write_checkpoints(tmp_path, "resnet18", [7])
    out_file = tmp_path / "r18.pt"
    code, out, err = run_cli(capsys, "export", str(run), "--format", "torchvision", "--out", str(out_file))
    assert code == 0, err
    assert out[0].startswith(f"wrote {out_file}: 122 tensors, torchvision resnet18(num_classes=5), from ")
    peer = resnet18(num_classes=5)
    peer.load_state_dict(torch.load(out_file, weights_only=True), strict=True)
    expected = model_from_config(recipe_from_dict({"model": {"name": "resnet18"}}).model, 5, seed=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(peer.eval()(x), expected(x), rtol=1e-4, atol=1e-5)
    code, out, _ = run_cli(capsys, "export", str(run), "--format", "torchvision", "--backbone-only",
                           "--out", str(out_file))
    assert code == 0 and out[0].startswith(f"wrote {out_file}: 100 tensors, the backbone of torchvision resnet18")
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5).body
    body.load_state_dict(torch.load(out_file, weights_only=True), strict=True)


def test_export_refuses_a_cifar_model_by_name(tmp_path, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1])
    code, out, err = run_cli(capsys, "export", str(run), "--format", "torchvision", "--out", str(tmp_path / "x.pt"))
    assert (code, out) == (2, [])
    assert err == ["rtrain: cannot export to torchvision: cifar_resnet20: no torchvision weight layout: "
                   "CIFAR ResNets have no torchvision equivalent"]
    assert not (tmp_path / "x.pt").exists()


def test_shared_only_load_reads_no_per_rank_state_and_does_not_warn(tmp_path, caplog):
    with CheckpointManager(tmp_path, world_size=1) as manager:
        manager.save(1, {"model": {"w": torch.ones(2)}}, per_rank={"rng": {"seed": torch.zeros(1)}})
    reader = CheckpointManager(tmp_path, world_size=4)
    with caplog.at_level("WARNING", logger="rtrain.checkpoint"):
        loaded = reader.latest(shared_only=True)
    assert loaded.per_rank == {} and torch.equal(loaded.shared["model"]["w"], torch.ones(2))
    assert not caplog.records
    assert list(reader.load(loaded.path).per_rank) == ["rng"]  # without shared_only: rank 0's own states
