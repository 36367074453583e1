"""Shards in an object store, against a real S3-compatible server (moto's standalone server on 127.0.0.1):
data_prep uploads, data_prep.index indexes an s3 prefix, the loader streams and resumes exactly as from
local files, missing buckets/keys are named in one line, and a 2-rank training run reads from s3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moto_s3 import S3Server, moto_s3_server
from ray_runs import STEPS, assert_same_weights, launch_command, mlflow_runs, quickstart_overrides, run_env, wait_for
from test_loader_fixtures import small_cfg, write_split
from wds_samples import assert_labels_match_images, read_epoch, write_with_tarwriter

from data_prep.index import main as index_main
from data_prep.storage import upload_output
from rtrain.checkpoint import CheckpointError, open_checkpoints
from rtrain.data import ShardError, build_loader
from rtrain.data.format import Manifest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def digits_in_s3(s3: S3Server, tmp_path_factory) -> tuple[Path, str]:
    """Real digits -> data_prep.imagenet with an s3:// --out (built in a kept stage folder, then uploaded)."""
    root = tmp_path_factory.mktemp("digits")
    _run("-m", "data_prep.samples", "digits", "--out", str(root / "folders"))
    url = s3.url("digits")
    _run("-m", "data_prep.imagenet", "--src", str(root / "folders"), "--out", url, "--stage", str(root / "stage"),
         "--shard-size", "200", "--workers", "2", "--no-progress")
    return root / "stage", url


def _batches(cfg, train: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=64, seed=5, train=train)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_data_prep_uploads_and_the_loader_reads_a_full_epoch(s3: S3Server, digits_in_s3) -> None:
    stage, url = digits_in_s3
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="digits/train/")["Contents"]
    local = Manifest.load(stage / "train" / "manifest.json")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == sorted(
        [s.name for s in local.shards] + ["manifest.json"])
    local_epoch = _batches(small_cfg(stage, num_workers=2), train=False)
    remote_epoch = _batches(small_cfg(url, num_workers=2), train=False)
    assert _same(local_epoch, remote_epoch)
    assert sum(len(y) for _, y in remote_epoch) == local.num_samples  # eval: every sample, once
    verified = _batches(small_cfg(url, verify_sha256=True))
    assert _same(verified, _batches(small_cfg(stage)))


def test_resume_mid_epoch_over_s3_equals_local(digits_in_s3) -> None:
    stage, url = digits_in_s3
    straight = _batches(small_cfg(stage, num_workers=2))
    cfg = small_cfg(url, num_workers=2)
    first = build_loader(cfg, "train", rank=0, world_size=1, batch_size=64, seed=5, train=True)
    head = [(x.clone(), y.clone()) for _, (x, y) in zip(range(7), first)]
    resumed = build_loader(cfg, "train", rank=0, world_size=1, batch_size=64, seed=5, train=True)
    resumed.load_state_dict(first.state_dict())
    assert _same(head + [(x.clone(), y.clone()) for x, y in resumed], straight)


def test_index_an_s3_prefix_and_train_from_it(s3: S3Server, tmp_path: Path) -> None:
    client = s3.client()
    for index, ids in enumerate([range(0, 9), range(9, 14)]):
        shard = write_with_tarwriter(tmp_path / f"m-{index}.tar", ids, "png_json")
        client.upload_file(str(shard), s3.bucket, f"mirror/in/m-{index}.tar")
    assert index_main([s3.url("mirror", "in"), "--out", s3.url("indexed"), "--split", "val"]) == 0
    body = client.get_object(Bucket=s3.bucket, Key="indexed/val/manifest.json")["Body"].read().decode()
    manifest = Manifest.loads(body)
    assert manifest.shard_root == s3.url("mirror", "in") and manifest.num_samples == 14
    assert manifest.keys.image == "png" and manifest.keys.label_field == "label"
    mirror = {"allowed_shard_roots": [s3.url("mirror")]}  # the index sends the loader to another prefix
    labels, levels = read_epoch(small_cfg(s3.url("indexed"), num_workers=2, **mirror), split="val")
    assert sorted(labels) == list(range(14))
    assert_labels_match_images(labels, levels)


def test_missing_bucket_and_key_are_one_line_naming_the_url(s3: S3Server, tmp_path: Path, capsys) -> None:
    with pytest.raises(ShardError) as missing_bucket:
        build_loader(small_cfg("s3://no-such-bucket/data"), "train", rank=0, world_size=1, batch_size=4, seed=0,
                     train=True)
    message = str(missing_bucket.value)
    assert message.startswith("s3://no-such-bucket/data/train/manifest.json: not found") and "\n" not in message
    write_split(tmp_path, "train", [5, 5, 5])
    client = s3.client()
    for path in sorted((tmp_path / "train").iterdir()):
        client.upload_file(str(path), s3.bucket, f"gone/train/{path.name}")
    client.delete_object(Bucket=s3.bucket, Key="gone/train/train-000001.tar")
    with pytest.raises(ShardError) as missing_key:
        list(build_loader(small_cfg(s3.url("gone"), on_bad_sample="raise"), "train", rank=0, world_size=1,
                          batch_size=4, seed=0, train=True))
    message = str(missing_key.value)
    assert f"{s3.url('gone', 'train', 'train-000001.tar')}: not found" in message and "\n" not in message
    assert index_main([s3.url("nothing-here"), "--out", str(tmp_path / "idx")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"data_prep.index: error: {s3.url('nothing-here')}: no *.tar shards there"


@pytest.mark.slow
def test_two_rank_training_run_reads_its_shards_from_s3(digits_in_s3, tmp_path: Path) -> None:
    _, url = digits_in_s3
    proc = _run("-m", "rtrain.launch", "recipes/quickstart.yaml", f"data.source={url}",
                f"run.output_root={tmp_path}", "run.name=s3", "dist.launcher=local", "train.max_steps=4",
                "checkpoint.every_steps=4", "tracking.enabled=false", "eval.every_epochs=100",
                "train.log_every_steps=1", timeout=240)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["samples_seen"] == 4 * 128, summary
    assert [p.name for p in tmp_path.rglob("step-*") if p.is_dir()] == ["step-000000004"]


def _modified(client, bucket: str, prefix: str) -> dict:
    return {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}


def test_upload_rerun_sends_only_what_is_missing(s3: S3Server, digits_in_s3) -> None:
    stage, _ = digits_in_s3
    client = s3.client()
    upload_output(stage, s3.url("again"))
    client.delete_object(Bucket=s3.bucket, Key="again/train/train-000002.tar")  # an interrupted upload
    before = _modified(client, s3.bucket, "again/")
    upload_output(stage, s3.url("again"))
    after = _modified(client, s3.bucket, "again/")
    assert set(after) - set(before) == {"again/train/train-000002.tar"}
    assert all(after[k] == before[k] for k in before if k.endswith(".tar"))
    assert Manifest.loads(client.get_object(Bucket=s3.bucket, Key="again/val/manifest.json")["Body"].read().decode()) \
        == Manifest.load(stage / "val" / "manifest.json")


def test_a_node_cache_fetches_each_shard_once_verifies_it_and_is_shared(s3: S3Server, digits_in_s3, tmp_path):
    stage, url = digits_in_s3
    shards = [entry.name for entry in Manifest.load(stage / "train" / "manifest.json").shards]
    cached = {"cache_dir": str(tmp_path / "cache"), "cache_max_gb": 1.0}
    before = len(s3.gets("digits/train/"))
    local_epoch = _batches(small_cfg(stage, num_workers=2))
    assert _same(_batches(small_cfg(url, num_workers=2, **cached)), local_epoch)  # epoch 1: fetched
    first = s3.gets("digits/train/")[before:]
    assert sorted(set(first)) == sorted(f"digits/train/{name}" for name in shards)
    assert _same(_batches(small_cfg(url, num_workers=2, **cached)), local_epoch)  # epoch 2: from the cache
    assert len(s3.gets("digits/train/")) == before + len(first)  # not one shard byte from the server

    victim = next((tmp_path / "cache").glob("*.tar"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))  # one flipped byte on the node's disk
    assert _same(_batches(small_cfg(url, num_workers=2, **cached)), local_epoch)  # detected, fetched again
    assert len(s3.gets("digits/train/")) == before + len(first) + 1

    # Two ranks of a node (processes), with two loader worker processes each, start at once on an empty cache.
    shared = {"cache_dir": str(tmp_path / "shared"), "cache_max_gb": 1.0}
    before = len(s3.gets("digits/train/"))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ranks = [pool.submit(_rank_epoch, small_cfg(url, num_workers=2, **shared), rank) for rank in (0, 1)]
        assert all(future.result(timeout=300) for future in ranks)
    fetched = s3.gets("digits/train/")[before:]
    assert sorted(fetched) == sorted(set(fetched)) and fetched  # each shard downloaded once
    assert len(list((tmp_path / "shared").glob("*.tar"))) == len(set(fetched))


def _rank_epoch(cfg, rank: int) -> int:
    loader = build_loader(cfg, "train", rank=rank, world_size=2, batch_size=32, seed=5, train=True)
    return sum(len(y) for _, y in loader)


# ------------------------------------------------------------------------- checkpoints in the bucket

def _save_on_two_ranks(url: str, staging: Path, step: int, tag: str = "t", keep: int | None = 2, wait_s: float = 20,
                       retry_s: float = 0, **hooks) -> None:
    """Both ranks of a 2-rank job save `step` at once (threads: the protocol uses no collectives)."""
    errors = []

    def rank(r: int) -> None:
        manager = open_checkpoints(url, rank=r, world_size=2, keep=keep, staging=staging / f"r{r}", save_tag=tag,
                                   finalize_timeout_s=wait_s, retry_s=retry_s)
        for name, hook in hooks.items() if r == 0 else ():
            setattr(manager, name, hook(manager))
        try:
            shared = {"model": {"w": torch.full((4,), float(step))}} if r == 0 else {}
            manager.save(step, shared, {"rng": {"r": torch.tensor([r, step])}}, {"step": step} if r == 0 else None)
            manager.wait()  # rank 0: raises when the step was not published
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]


def _keys(s3: S3Server, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", []))


def test_checkpoints_in_a_bucket_commit_with_the_manifest_last_verify_prune_and_set_damage_aside(s3, tmp_path):
    url = s3.url("ckpt-protocol")
    for step in (3, 6, 9):
        _save_on_two_ranks(url, tmp_path, step)
    reader = open_checkpoints(url, rank=1, world_size=2, staging=tmp_path / "read")
    assert [p.name for p in reader.list()] == ["step-000000009", "step-000000006"]
    assert not _keys(s3, "ckpt-protocol/step-000000003")  # pruned (keep=2)
    loaded = reader.latest()
    assert loaded.step == 9 and str(loaded.path) == f"{url}/step-000000009" and loaded.meta == {"step": 9}
    assert torch.equal(loaded.shared["model"]["w"], torch.full((4,), 9.0))
    assert torch.equal(loaded.per_rank["rng"]["r"], torch.tensor([1, 9]))  # its own rank's state

    # Every object of step 12 uploaded but the manifest, then rank 0 died: that step does not exist.
    def no_manifest(manager):
        put = manager._put

        def refuse(rel: str, data: bytes) -> None:
            if rel.endswith("/MANIFEST.json"):
                raise ConnectionError("killed before the manifest")
            put(rel, data)
        return refuse

    with pytest.raises(CheckpointError, match=r"step-000000012: not published: cannot upload the checkpoint "
                                              r"\(ConnectionError: killed before the manifest\) \(tried 1 time"):
        _save_on_two_ranks(url, tmp_path, 12, tag="killed", _put=no_manifest)
    assert "ckpt-protocol/step-000000012/killed-12-1/rank-00001/rng.pt" in _keys(s3, "ckpt-protocol/step-000000012")
    assert [p.name for p in reader.list()] == ["step-000000009", "step-000000006"]
    assert reader.latest().step == 9

    # One flipped byte in the bucket: the manager falls back to step 6; a resume sets step 9 aside.
    key = "ckpt-protocol/step-000000009/t-9-1/rank-00001/rng.pt"
    body = bytearray(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
    assert reader.latest().step == 6
    resumed = open_checkpoints(url, rank=0, world_size=2, staging=tmp_path / "resume").resume()
    assert resumed.step == 6
    assert [p.name for p in reader.list()] == ["step-000000006"]
    damaged = _keys(s3, "ckpt-protocol/damaged/")
    assert any(k.endswith("/rank-00001/rng.pt") for k in damaged) and any(k.endswith(".reason") for k in damaged)
    reason = s3.client().get_object(Bucket=s3.bucket, Key=next(k for k in damaged if k.endswith(".reason")))
    assert "rank-00001/rng.pt fails its sha256 check" in reason["Body"].read().decode()

    _save_on_two_ranks(url, tmp_path, 12, tag="again")  # the killed step's leftovers are written over
    assert [p.name for p in reader.list()] == ["step-000000012", "step-000000006"]
    assert reader.latest().step == 12


@pytest.mark.slow
def test_a_run_whose_local_disk_is_lost_resumes_from_the_bucket_bit_identically(s3, digits_shards, reference_run,
                                                                                  tmp_path):
    url = s3.url("runs", "spot")
    node = tmp_path / "node"  # the run directory's disk, lost with the node
    cmd = launch_command(quickstart_overrides(digits_shards, node, "spot", STEPS, "dist.launcher=local",
                                              f"checkpoint.dir={url}", "checkpoint.async_save=true",
                                              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env(),
                            start_new_session=True)
    try:
        wait_for(lambda: [k for k in _keys(s3, "runs/spot/") if k.endswith("MANIFEST.json")] or proc.poll() is not None,
                 300, "a checkpoint in the bucket")
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    published = [k for k in _keys(s3, "runs/spot/") if k.endswith("MANIFEST.json")]
    assert published and not any(f"step-{STEPS:09d}" in k for k in published)
    shutil.rmtree(node)  # a fresh machine: an empty working directory

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=run_env())
    assert again.returncode == 0, again.stderr[-5000:]
    assert f"resumed from {url}/step-" in again.stderr
    final = open_checkpoints(url, world_size=2, staging=tmp_path / "read").latest()
    assert final.step == STEPS
    assert_same_weights(reference_run.weights(), final.shared["model"], "the run resumed from the bucket")
    [run] = mlflow_runs(tmp_path, "spot")  # the same MLflow run, continued
    assert run.info.status == "FINISHED" and run.data.tags["rtrain.checkpoint.latest"].startswith(url)
    report = _run("-m", "rtrain.cli", "eval", url)  # rtrain eval reads the newest verified one from the bucket
    assert json.loads(report.stdout.strip().splitlines()[-1])["checkpoint"] == f"{url}/step-{STEPS:09d}"
    staged = node / "spot" / ".checkpoint-staging"
    assert staged.is_dir() and not [p for p in staged.rglob("*") if p.is_file()]  # staged files go once uploaded
    assert not (node / "spot" / "checkpoints").exists()


def test_preflight_names_a_checkpoint_bucket_it_cannot_write(s3, digits_in_s3, tmp_path):
    from rtrain.config import load_recipe
    from rtrain.launch.preflight import PreflightError, preflight
    from rtrain.launch.recipe import prepare_recipe

    def problems(url: str) -> list[str]:
        recipe = load_recipe(REPO / "recipes/quickstart.yaml", [
            f"data.source={digits_in_s3[1]}", f"checkpoint.dir={url}", f"run.output_root={tmp_path}",
            "tracking.enabled=false"])
        try:
            preflight(prepare_recipe(recipe))
        except PreflightError as exc:
            return exc.problems
        return []

    assert problems(s3.url("preflight", "ok")) == []
    assert not _keys(s3, "preflight/")  # the probe object is gone again
    [line] = problems("s3://no-such-bucket-rtrain/run")
    assert line.startswith("checkpoint.dir='s3://no-such-bucket-rtrain/run': cannot write there (") and "\n" not in line


def _moto_again(s3: S3Server, workdir: Path) -> subprocess.Popen:
    """The store back after an outage, on the same port (moto keeps nothing: the bucket is made anew)."""
    port = s3.endpoint.rsplit(":", 1)[1]
    with open(workdir / "moto-again.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: _answers(s3) or process.poll() is not None, 60, "moto to answer again")
    s3.client().create_bucket(Bucket=s3.bucket)
    return process


def _answers(s3: S3Server) -> bool:
    try:
        s3.client().list_buckets()
        return True
    except Exception:  # noqa: BLE001
        return False


def test_a_store_outage_during_saves_is_retried_and_training_goes_on(tmp_path, caplog):
    """Its own server, stopped for real: a save retries until the store is back and publishes; one that outlasts
    checkpoint.upload_retry_s is given up with a warning (no exception: training goes on), nothing half-visible,
    and wait() (the run's end) names it; the next save publishes."""
    with moto_s3_server(tmp_path) as s3:
        url = s3.url("outage")
        rank0 = open_checkpoints(url, keep=3, staging=tmp_path / "stage", save_tag="o", retry_s=60, async_save=True)
        rank0.save(3, {"model": {"w": torch.zeros(2)}})
        rank0.wait()
        os.kill(s3.pid, signal.SIGTERM)  # the store goes away
        wait_for(lambda: not _answers(s3), 30, "moto to stop")
        rank0.save(6, {"model": {"w": torch.ones(2)}})  # in the background: returns at once
        wait_for(lambda: "upload failed" in caplog.text, 60, "a failed upload to be retried")
        again = _moto_again(s3, tmp_path)
        try:
            rank0.wait()  # the retried upload went through
            assert "published s3://rtrain-test/outage/step-000000006 after" in caplog.text
            assert [p.name for p in rank0.list()] == ["step-000000006"]  # (moto lost step 3 with its memory)
            again.terminate()
            again.wait(timeout=30)
            wait_for(lambda: not _answers(s3), 30, "moto to stop")
            short = open_checkpoints(url, keep=3, staging=tmp_path / "stage", save_tag="p", retry_s=2)
            short.save(9, {"model": {"w": torch.full((2,), 9.0)}})  # synchronous, gives up after ~2 s: no raise
            with pytest.raises(CheckpointError, match=r"step-000000009: not published: cannot upload the "
                                                      r"checkpoint \(.*\(tried \d+ time\(s\) over \d+ s; "
                                                      r"checkpoint.upload_retry_s=2\)"):
                short.wait()  # the run's end would fail on it
            again = _moto_again(s3, tmp_path)
            short.save(12, {"model": {"w": torch.full((2,), 12.0)}})
            short.wait()
            assert [p.name for p in short.list()] == ["step-000000012"]
            assert not _keys(s3, "outage/step-000000009")  # nothing of the given-up step is visible
        finally:
            again.terminate()
            again.wait(timeout=30)
