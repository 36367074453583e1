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
                      resolved_recipe: bool = False, data: dict | None = None) -> Path:
    """A run directory `root/run` whose checkpoints hold models built from a recipe, one seed per step; `data`
    replaces keys of the recipe's data section."""
    raw = {"run": {"name": "run", "output_root": str(root)},
           "model": {"name": model_name, "num_classes": 5},
           "data": {"source": str(root / "shards"), "image_size": 16, "eval_resize": 18, "num_workers": 0,
                    "augment": "none", **(data or {})},
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


def test_ten_crop_of_a_cifar_recipe_cuts_the_models_input_from_a_square_sized_to_it(tmp_path, shards, capsys):
    """The quickstart's case: CIFAR eval transform, 32-px model (here 16), data.eval_resize left at 256. The
    10 crops come from a 18-px square (16 x 256/224), not 16-px corners of a 256-px one; stderr says so."""
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1], data={"eval_resize": 256, "eval_transform": "cifar"})
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", "ten_crop", "--batch-size", "4")
    assert code == 0, err
    report = report_of(out)
    assert (report["image_size"], report["ten_crop_square"], report["images"]) == (16, 18, 11)
    assert out[2] == "mode         ten_crop (10 crops of 16 px from a 18-px square and their mirrors, softmax averaged)"
    assert err == ["rtrain eval: ten_crop: data.eval_resize=256 does not fit the model's input of 16 px "
                   "(data.image_size); the CIFAR eval transform takes images whole, so the 10 crops are cut from a "
                   "18-px square (16 x 256/224)"]


def test_ten_crop_keeps_a_square_that_fits_without_a_word(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1])  # image_size 16, eval_resize 18
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", "ten_crop", "--batch-size", "4")
    assert code == 0 and err == [] and report_of(out)["ten_crop_square"] == 18


def test_ten_crop_of_a_resize_center_recipe_warns_of_a_square_far_larger_than_the_crop(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1], data={"eval_resize": 64})
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", "ten_crop", "--batch-size", "4", "--limit", "2")
    assert code == 0 and report_of(out)["ten_crop_square"] == 64  # the recipe's center view is cut from it too
    assert err == ["rtrain eval: ten_crop: data.eval_resize=64 does not fit the model's input of 16 px "
                   "(data.image_size): each crop sees 6.2% of the 64-px square (the recipe's center view is cut "
                   "the same way); a 16-px model fits a square of 18 (16 x 256/224) up to 32"]


def test_ten_crop_from_a_square_smaller_than_the_crop_is_refused_in_one_line(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1], data={"eval_resize": 12})
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", "ten_crop")
    assert (code, out) == (2, [])
    assert err == ["rtrain: ten_crop: data.eval_resize=12 does not fit the model's input of 16 px "
                   "(data.image_size): it is smaller than the crop; a 16-px model fits a square of 18 "
                   "(16 x 256/224) up to 32"]


def test_multi_scale_defaults_to_the_papers_scales_relative_to_the_models_input(tmp_path, shards, capsys):
    run = write_checkpoints(tmp_path, "cifar_resnet20", [1], data={"eval_transform": "cifar"})
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", "multi_scale", "--batch-size", "4")
    assert code == 0 and err == [], err
    assert report_of(out)["scales"] == [16, 18, 27, 34, 45]  # 224, 256, 384, 480, 640 x 16/224
    code, out, err = run_cli(capsys, "eval", str(run), "--mode", "multi_scale", "--scales", "16,224",
                             "--limit", "2")
    assert code == 0 and report_of(out)["scales"] == [16, 224]  # given scales are used, with a warning
    assert err == ["rtrain eval: multi_scale: scales 224 are far from the model's input of 16 px "
                   "(data.image_size); the paper's scales for a 16-px model are 16, 18, 27, 34, 45"]


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
