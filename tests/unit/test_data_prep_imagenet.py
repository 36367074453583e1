"""ImageNet folders -> shards, run in-process (Ray itself is covered in tests/integration)."""

import io
import json
import tarfile

import pytest
from PIL import Image

from data_prep.imagenet import build_parser, main, run
from data_prep.parallel import run_shard_jobs_in_process
from data_prep.shards import iter_samples
from data_prep.synthetic import SyntheticSpec, write_synthetic
from rtrain.data.format import MANIFEST_NAME, Manifest, decode_cls

SPEC = SyntheticSpec(classes=3, per_class=6, val_per_class=2, image_size=(64, 48))
GT_FILES = ["LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "val_pairs.txt",
            "imagenet_2012_validation_synset_labels.txt"]


def _prep(src, out, *extra):
    args = build_parser().parse_args(["--src", str(src), "--out", str(out), "--shard-size", "4", *extra])
    return run(args, run_shard_jobs_in_process)


def _samples(split_dir):
    manifest = Manifest.load(split_dir / MANIFEST_NAME)
    return {key: fields for entry in manifest.shards for key, fields in iter_samples(split_dir / entry.name)}


@pytest.fixture(scope="module")
def folders_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("folders")
    write_synthetic(src, SPEC)
    return src


@pytest.fixture(scope="module")
def folders_out(folders_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    _prep(folders_src, out)
    return out


def test_every_quirk_ends_where_it_should(folders_src, folders_out):
    quirks = json.loads((folders_src / "quirks.json").read_text())
    for split in ("train", "val"):
        manifest = Manifest.load(folders_out / split / MANIFEST_NAME)
        samples = _samples(folders_out / split)
        quarantined = {q.path for q in manifest.quarantined}
        for relpath, quirk in ((p, q) for p, q in quirks.items() if p.startswith(split)):
            key = relpath.rsplit("/", 1)[1].split(".")[0]
            if quirk["fate"] == "quarantined":
                assert relpath in quarantined and key not in samples
                continue
            assert relpath not in quarantined
            image = Image.open(io.BytesIO(samples[key]["jpg"]))
            assert image.format == "JPEG"
            if quirk["fate"] == "kept:grayscale":
                assert image.mode == "L"
            else:
                assert image.mode == "RGB" and manifest.converted[quirk["fate"].split(":")[1]] >= 1


def test_nothing_is_dropped_silently(folders_src, folders_out):
    for split in ("train", "val"):
        manifest = Manifest.load(folders_out / split / MANIFEST_NAME)
        found = [p for p in (folders_src / split).rglob("*") if p.is_file()]
        assert manifest.num_samples + len(manifest.quarantined) == len(found)
        assert manifest.checked_pixels == 89_478_485  # every header read against the budget (DALI relies on it)
        assert len(_samples(folders_out / split)) == manifest.num_samples


def test_keys_classes_and_labels(folders_out):
    manifest = Manifest.load(folders_out / "train" / MANIFEST_NAME)
    assert manifest.classes == {"n00000000": 0, "n00000001": 1, "n00000002": 2}
    for key, fields in _samples(folders_out / "train").items():
        assert decode_cls(fields["cls"]) == int(key.split("_")[0][1:])  # n0000000K_... is class K
    assert all(k.startswith("ILSVRC2012_val_") for k in _samples(folders_out / "val"))


def test_tar_members_are_deterministic_and_ordered(folders_out):
    entry = Manifest.load(folders_out / "train" / MANIFEST_NAME).shards[0]
    with tarfile.open(folders_out / "train" / entry.name) as tar:
        members = tar.getmembers()
    assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644) for m in members)
    assert [m.name.split(".")[1] for m in members] == ["cls", "jpg"] * (len(members) // 2)


def test_same_input_gives_identical_bytes(folders_src, folders_out, tmp_path):
    _prep(folders_src, tmp_path)
    for split in ("train", "val"):
        assert (tmp_path / split / MANIFEST_NAME).read_bytes() == (folders_out / split / MANIFEST_NAME).read_bytes()
        for entry in Manifest.load(tmp_path / split / MANIFEST_NAME).shards:
            assert (tmp_path / split / entry.name).read_bytes() == (folders_out / split / entry.name).read_bytes()


@pytest.mark.parametrize("gt_file", GT_FILES)
def test_flat_val_with_each_ground_truth_format(gt_file, folders_out, tmp_path):
    src = tmp_path / "src"
    write_synthetic(src, SyntheticSpec(**{**SPEC.__dict__, "val_layout": "flat"}))
    _prep(src, tmp_path / "out", "--splits", "val", "--val-ground-truth", str(src / gt_file))
    flat = Manifest.load(tmp_path / "out" / "val" / MANIFEST_NAME)
    # the same images, labelled through a ground-truth file, give the very same shards
    assert flat.shards == Manifest.load(folders_out / "val" / MANIFEST_NAME).shards


def test_rerun_reuses_good_shards_and_redoes_damaged_ones(folders_src, folders_out, tmp_path):
    _prep(folders_src, tmp_path)
    train = tmp_path / "train"
    shards = Manifest.load(train / MANIFEST_NAME).shards
    damaged = bytearray((train / shards[0].name).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (train / shards[0].name).write_bytes(bytes(damaged))
    (train / shards[1].name).unlink()
    (train / f".{shards[2].name}.tmp-leftover").write_bytes(b"partial")
    report = _prep(folders_src, tmp_path)[0]
    assert report.shards_reused == len(shards) - 2
    assert report.manifest.shards == shards
    assert not list(train.glob(".*tmp*"))


def test_stale_shards_from_an_older_plan_are_removed(folders_src, tmp_path):
    _prep(folders_src, tmp_path)
    _prep(folders_src, tmp_path, "--shard-size", "100")
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["train-000000.tar"]


def test_shard_bytes_and_max_side_options(folders_src, tmp_path):
    args = ["--src", str(folders_src), "--out", str(tmp_path / "b"), "--shard-bytes", "20KB", "--max-side", "32"]
    report = run(build_parser().parse_args(args), run_shard_jobs_in_process)[0]
    assert len(report.manifest.shards) > 2 and report.manifest.options["shard_bytes"] == 20_000
    for fields in _samples(tmp_path / "b" / "train").values():
        assert max(Image.open(io.BytesIO(fields["jpg"])).size) <= 32


def test_bad_inputs_give_errors_naming_the_thing(folders_src, tmp_path, capsys):
    flat = tmp_path / "flat"
    write_synthetic(flat, SyntheticSpec(classes=2, per_class=1, val_per_class=1, image_size=(16, 16),
                                        val_layout="flat", quirks=False))
    assert main(["--src", str(flat), "--out", str(tmp_path / "o")]) == 2
    assert "val is flat: pass --val-ground-truth" in capsys.readouterr().err
    (flat / "train" / "n00000001" / "n00000000_1.png").write_bytes(b"x")
    assert main(["--src", str(flat), "--out", str(tmp_path / "o"), "--splits", "train"]) == 2
    assert "n00000000_1" in capsys.readouterr().err
    assert main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
