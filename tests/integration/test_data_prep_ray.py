"""data_prep on a real local Ray: parallel shard writing gives the same bytes as one process."""

from pathlib import Path

import pytest

from data_prep.imagenet import build_parser, main, run
from data_prep.parallel import run_shard_jobs_in_process
from data_prep.synthetic import SyntheticSpec, write_synthetic
from data_prep.verify import main as verify_main
from rtrain.data.format import MANIFEST_NAME

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    write_synthetic(root, SyntheticSpec(classes=3, per_class=8, val_per_class=2, image_size=(96, 64)))
    return root


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.tar"))} | {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob(f"*/{MANIFEST_NAME}"))
    }


def test_parallel_ray_run_matches_in_process_run(local_ray, src, tmp_path, capsys):
    argv = ["--src", str(src), "--out", str(tmp_path / "ray"), "--shard-size", "3", "--workers", "2"]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "== train" in summary and "quarantined" in summary
    assert local_ray.cluster_resources().get("CPU") == 2
    serial = ["--src", str(src), "--out", str(tmp_path / "serial"), "--shard-size", "3"]
    run(build_parser().parse_args(serial), run_shard_jobs_in_process)
    assert _shard_bytes(tmp_path / "ray") == _shard_bytes(tmp_path / "serial")
    assert verify_main([str(tmp_path / "ray")]) == 0
