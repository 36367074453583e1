"""`rtrain eval` and `rtrain export` as a user runs them: the quickstart recipe trains a few steps with the real
worker (1 rank on gloo, tiny photo-like shards), then `python -m rtrain.cli eval RUN_DIR` runs as a
subprocess in each mode. The center mode must reproduce the training run's own final evaluation (same
weights, same loader); a missing checkpoint ends with one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_loader_fixtures import write_split  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BATCH = 16

pytestmark = [pytest.mark.integration]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval_cli")
    write_split(root / "shards", "train", [40, 24], num_classes=4)
    write_split(root / "shards", "val", [12, 8], num_classes=4)
    done = _run("-m", "rtrain.launch", "recipes/quickstart.yaml", f"data.source={root / 'shards'}",
                f"run.output_root={root / 'runs'}", "run.name=tiny", "dist.launcher=local", "dist.num_workers=1",
                f"train.global_batch={BATCH}", "train.max_steps=4", "checkpoint.every_steps=2",
                "eval.every_epochs=100", "tracking.enabled=false", "data.num_workers=0", "data.shuffle_buffer=16")
    assert done.returncode == 0, done.stderr[-4000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


def _eval(run: Path, *options: str) -> dict:
    done = _run("-m", "rtrain.cli", "eval", str(run), "--batch-size", str(BATCH), *options)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("checkpoint   ") and lines[3].startswith("top-1 error  ")
    return json.loads(lines[-1])


def test_center_reproduces_the_runs_final_evaluation(trained_run):
    root, summary = trained_run
    report = _eval(root / "runs" / "tiny")
    assert report["step"] == summary["step"] == 4
    assert report["checkpoint"] == str(root / "runs" / "tiny" / "checkpoints" / "step-000000004")
    assert report["images"] == 20 and report["model"] == "cifar_resnet20"
    assert report["top1_error"] == pytest.approx(1 - summary["val_top1"])
    assert report["top5_error"] == pytest.approx(1 - summary["val_top5"])


@pytest.mark.parametrize("mode, options, scales", [
    ("ten_crop", [], None),
    ("multi_scale", ["--scales", "32,48"], [32, 48]),
    ("multi_scale", [], [32, 36, 54, 68, 91]),  # the paper's 224..640 in proportion to the 32-px input
])
def test_paper_modes_run_on_the_trained_checkpoint(trained_run, mode, options, scales):
    root, _ = trained_run
    report = _eval(root / "runs" / "tiny", "--mode", mode, *options)
    assert report["mode"] == mode and report["images"] == 20 and report["step"] == 4
    assert report["scales"] == scales and report["image_size"] == 32
    assert report["ten_crop_square"] == (36 if mode == "ten_crop" else None)  # 32 x 256/224
    assert 0 <= report["top5_error"] <= report["top1_error"] <= 1


def test_ten_crop_on_the_quickstarts_default_eval_resize_is_sized_to_the_model(trained_run):
    """The quickstart recipe keeps data.eval_resize at 256 with its 32-px CIFAR model (the run above does not
    change it): `rtrain eval --mode ten_crop` cuts the 10 crops from a 36-px square (32 x 256/224), not 32-px
    corners of a 256-px one, and says so on stderr."""
    root, _ = trained_run
    done = _run("-m", "rtrain.cli", "eval", str(root / "runs" / "tiny"), "--mode", "ten_crop",
                "--batch-size", str(BATCH))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["ten_crop_square"], report["image_size"], report["images"]) == (36, 32, 20)
    assert ("rtrain eval: ten_crop: data.eval_resize=256 does not fit the model's input of 32 px (data.image_size); "
            "the CIFAR eval transform takes images whole, so the 10 crops are cut from a 36-px square "
            "(32 x 256/224)") in done.stderr.splitlines()


def test_cifar_checkpoint_export_is_refused_in_one_line(trained_run, tmp_path):
    root, _ = trained_run
    done = _run("-m", "rtrain.cli", "export", str(root / "runs" / "tiny"), "--format", "torchvision",
                "--out", str(tmp_path / "x.pt"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["rtrain: cannot export to torchvision: cifar_resnet20: no torchvision "
                                        "weight layout: CIFAR ResNets have no torchvision equivalent"]


def test_missing_checkpoint_exits_2_with_one_line(tmp_path):
    done = _run("-m", "rtrain.cli", "eval", str(tmp_path / "missing"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"rtrain: {tmp_path / 'missing'}: no such checkpoint or run directory"]
