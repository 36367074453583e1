"""The object-store commit protocol (rtrain.checkpoint.remote) against fsspec's in-memory store, with what a
stranger with write access to the bucket can leave there: lying DONEs and manifests, names rtrain never
writes, oversized JSON, a step of another location. The same code runs against a real S3 server in
tests/integration/test_s3.py; here the store is in-process, so every case is cheap."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest
import torch

from rtrain.checkpoint import CheckpointError, files, open_checkpoints


@pytest.fixture
def url() -> str:
    return f"memory://rtrain-test/{uuid.uuid4().hex[:8]}/checkpoints"


def _manager(url: str, tmp_path: Path, rank: int = 0, **kwargs):
    kwargs = {"world_size": 2, "keep": 2, "save_tag": "t", "finalize_timeout_s": 5, "retry_s": 0, **kwargs}
    return open_checkpoints(url, rank=rank, staging=tmp_path / f"stage-{rank}-{uuid.uuid4().hex[:4]}", **kwargs)


def _save(url: str, tmp_path: Path, step: int, hooks: dict | None = None, **kwargs) -> list[Exception]:
    """Both ranks of a 2-rank job save `step` (threads: the protocol uses no collectives); their errors."""
    errors: list[Exception] = []

    def rank(r: int) -> None:
        manager = _manager(url, tmp_path, r, **kwargs)
        for name, hook in (hooks or {}).get(r, {}).items():
            setattr(manager, name, hook(manager))
        try:
            manager.save(step, {"model": {"w": torch.full((4,), float(step))}} if r == 0 else {},
                         {"rng": {"r": torch.tensor([r, step])}}, {"step": step} if r == 0 else None)
            manager.wait()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _objects(manager) -> list[str]:
    return sorted(manager._listing())


def _refusing(suffix: str):
    def hook(manager):
        put = manager._put

        def refuse(rel: str, data: bytes) -> None:
            if rel.endswith(suffix):
                raise ConnectionError("the store went away")
            put(rel, data)
        return refuse
    return hook


def test_a_resave_keeps_the_published_step_until_its_manifest_replaces_it(url, tmp_path):
    for step in (3, 6, 9):
        assert _save(url, tmp_path, step) == []
    reader = _manager(url, tmp_path, 1)
    assert [p.name for p in reader.list()] == ["step-000000009", "step-000000006"]  # keep=2
    assert [o for o in _objects(reader) if o.startswith("step-000000009/")] == [
        "step-000000009/MANIFEST.json", "step-000000009/t-9-1/meta.json", "step-000000009/t-9-1/rank-00000/DONE",
        "step-000000009/t-9-1/rank-00000/rng.pt", "step-000000009/t-9-1/rank-00001/DONE",
        "step-000000009/t-9-1/rank-00001/rng.pt", "step-000000009/t-9-1/shared/model.pt"]
    loaded = reader.latest()
    assert loaded.step == 9 and torch.equal(loaded.per_rank["rng"]["r"], torch.tensor([1, 9]))
    assert torch.equal(reader.per_rank_states_of(loaded, 0)["rng"]["r"], torch.tensor([0, 9]))

    # Another timeline saves step 9 again and its manifest never goes up: the published step 9 is untouched.
    [error] = _save(url, tmp_path, 9, {0: {"_put": _refusing("MANIFEST.json")}}, save_tag="b")
    assert "step-000000009: not published" in str(error) and "ConnectionError" in str(error)
    assert reader.latest().meta == {"step": 9} and reader.meta_of(f"{url}/step-000000009") == {"step": 9}
    assert any(o.startswith("step-000000009/b-9-1/") for o in _objects(reader))  # its files, named by nothing

    assert _save(url, tmp_path, 9, save_tag="c") == []  # its manifest replaces the old one in one put
    assert {o.split("/")[1] for o in _objects(reader) if o.startswith("step-000000009/")} == {
        "MANIFEST.json", "c-9-1"}  # earlier saves of the step pruned
    assert reader.latest().step == 9


def test_a_done_listing_files_that_are_not_its_ranks_is_never_published(url, tmp_path):
    assert _save(url, tmp_path, 3) == []

    def lying_done(manager):
        put = manager._put

        def lie(rel: str, data: bytes) -> None:
            if rel.endswith("/DONE"):
                done = json.loads(data)
                done["files"]["shared/model.pt"] = {"sha256": "0" * 64, "size": 1}  # rank 1 never writes it
                data = json.dumps(done).encode()
            put(rel, data)
        return lie

    errors = _save(url, tmp_path, 6, {1: {"_put": lying_done}})
    assert len(errors) == 1 and "rank-00001/DONE: file entry 'shared/model.pt' is not one of rank 1's" in str(errors[0])
    reader = _manager(url, tmp_path)
    assert [p.name for p in reader.list()] == ["step-000000003"]  # and step 3 was not pruned for it
    assert reader.latest().step == 3


@pytest.mark.parametrize("change, reason", [
    (lambda m: m["files"].update({"rank-00000/" + "x" * 300: {"sha256": "0" * 64, "size": 1}}), "not a name rtrain"),
    (lambda m: m["files"].update({"shared/a\nb.pt": {"sha256": "0" * 64, "size": 1}}), "not a name rtrain"),
    (lambda m: m["files"].update({"../../elsewhere.pt": {"sha256": "0" * 64, "size": 1}}), "points outside"),
    (lambda m: m["files"].update({"rank-00007/rng.pt": {"sha256": "0" * 64, "size": 1}}), "neither shared/ nor a"),
    (lambda m: m["files"]["meta.json"].update(size="12"), "lacks sha256/size"),
    (lambda m: m["files"]["meta.json"].update(sha256="ABC"), "lacks sha256/size"),
    (lambda m: m.update(world_size=0), "'world_size' is missing or not an int >= 1"),
    (lambda m: m.update(step=3), "says step 3, the folder disagrees"),
    (lambda m: m.update(folder="../x"), "'folder' is not a save id"),
    (lambda m: m.update(folder=""), "'folder' is not a save id"),  # not the first layout: it has no 'folder'
    (lambda m: m["files"].update({"shared/" + "\u4e2d" * 190 + ".pt": {"sha256": "0" * 64, "size": 1}}),
     "not a name rtrain"),  # 573 bytes: a local file name too long
    (lambda m: m["files"].update({"rank-\u0660\u0660\u0660\u0660\u0661/rng.pt": {"sha256": "0" * 64, "size": 1}}),
     "not a name rtrain"),
    (lambda m: m.update(files=[[[[]]]] * 3), "'files' is missing or empty"),
])
def test_a_lying_manifest_is_a_damaged_step_named_in_one_line(url, tmp_path, caplog, change, reason):
    assert _save(url, tmp_path, 3) == [] and _save(url, tmp_path, 6) == []
    reader = _manager(url, tmp_path)
    manifest = json.loads(reader._get("step-000000006/MANIFEST.json"))
    change(manifest)
    reader._put("step-000000006/MANIFEST.json", json.dumps(manifest).encode())
    with caplog.at_level(logging.WARNING, "rtrain.checkpoint"):
        assert reader.latest().step == 3
    assert f"{url}/step-000000006: bad MANIFEST.json" in caplog.text or "disagrees" in caplog.text
    assert reason in caplog.text
    with pytest.raises(CheckpointError, match="step-000000006"):
        reader.meta_of(f"{url}/step-000000006")


def test_oversized_or_nested_json_and_another_location_are_refused_without_reading_them(url, tmp_path, caplog,
                                                                                         monkeypatch):
    assert _save(url, tmp_path, 3) == [] and _save(url, tmp_path, 6) == []
    reader = _manager(url, tmp_path)
    reader._put("step-000000006/MANIFEST.json", b"[" * 100_000 + b"]" * 100_000)
    assert reader.latest().step == 3 and "unreadable MANIFEST.json" in caplog.text
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1000)
    reader._put("step-000000006/MANIFEST.json", b" " * 5000)
    with pytest.raises(CheckpointError, match=r"step-000000006/MANIFEST.json: over 0 MiB"):
        reader.load(f"{url}/step-000000006")
    monkeypatch.undo()
    other = url.replace("/checkpoints", "/elsewhere")  # a step of the same name in another place: not ours
    with pytest.raises(CheckpointError, match=rf"{other}/step-000000003: not a checkpoint step of {url}"):
        reader.load(f"{other}/step-000000003")
    # `//` in the URL is the same place: its steps are seen
    doubled = url.replace("rtrain-test/", "rtrain-test//")
    assert [p.name for p in _manager(doubled, tmp_path).list()] == ["step-000000006", "step-000000003"]


def test_a_staging_folder_that_cannot_take_the_files_fails_the_save_at_once(url, tmp_path):
    manager = _manager(url, tmp_path, world_size=1, retry_s=3600)
    manager.staging.rmdir()
    manager.staging.write_text("a file where the staging folder should be")
    with pytest.raises(CheckpointError, match=r"step-000000003: cannot stage the checkpoint in .*stage-0-.*"
                                              r"\(a local folder, before the upload\): NotADirectoryError"):
        manager.save(3, {"model": {"w": torch.zeros(2)}})  # synchronous: an hour of retries would hang here
    assert manager.list() == []


def test_steps_of_the_first_remote_layout_are_read_and_kept(url, tmp_path):
    manager = _manager(url, tmp_path, world_size=1)
    manager.save(3, {"model": {"w": torch.zeros(2)}}, {"rng": {"r": torch.tensor([0, 3])}})
    # step 3 moved to the layout without a save folder (files under step-N/ itself)
    manifest = json.loads(manager._get("step-000000003/MANIFEST.json"))
    for name in manifest["files"]:
        manager.fs.copy(manager._key("step-000000003", manifest["folder"], name), manager._key("step-000000003", name))
    manager.fs.rm(manager._key("step-000000003", manifest.pop("folder")), recursive=True)
    manager._put("step-000000003/MANIFEST.json", json.dumps(manifest).encode())
    assert manager.latest().step == 3
    manager.save(6, {"model": {"w": torch.ones(2)}}, {"rng": {"r": torch.tensor([0, 6])}})
    manager.wait()
    assert "step-000000003/shared/model.pt" in _objects(manager)  # not taken for a leftover
    assert [p.name for p in manager.list()] == ["step-000000006", "step-000000003"]


def test_the_default_staging_folder_is_never_someone_elses(url, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    planted = tmp_path / f"rtrain-checkpoint-staging-u{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)  # writable by everyone: a name anyone could have made first
    manager = open_checkpoints(url, world_size=1)
    assert manager.staging != planted and (manager.staging.stat().st_mode & 0o077) == 0


def test_a_step_missing_a_rank_file_is_never_published_nor_prunes_the_good_one(url, tmp_path):
    assert _save(url, tmp_path, 3, keep=1) == []

    def lose_its_states(manager):  # rank 1's upload of its states never arrives; its DONE does
        def put_file(local: str, key: str) -> None:
            if not key.endswith("rng.pt"):
                manager.fs.put_file(local, key)
        manager.fs = _FsWith(manager.fs, put_file=put_file)
        return manager._put

    [error] = _save(url, tmp_path, 6, {1: {"_put": lose_its_states}}, keep=1)
    assert "step-000000006: not published: " in str(error) and "missing file rank-00001/rng.pt" in str(error)
    reader = _manager(url, tmp_path)
    assert [p.name for p in reader.list()] == ["step-000000003"] and reader.latest().step == 3


class _FsWith:
    """An fsspec filesystem with some methods replaced."""

    def __init__(self, fs, **methods) -> None:
        self._fs, self._methods = fs, methods

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._fs, name)


def test_an_object_that_grew_or_went_since_it_was_listed_is_named_not_read_whole(tmp_path):
    from rtrain.checkpoint.objects import download_capped
    from rtrain.checkpoint.files import CheckpointError as Error
    import fsspec

    fs = fsspec.filesystem("memory")
    key = f"/rtrain-test/{uuid.uuid4().hex[:8]}/big"
    fs.pipe_file(key, b"x" * (3 << 20))
    with pytest.raises(Error, match=r"^step 6: file a is larger than the 100 bytes its manifest says"):
        download_capped(fs, key, tmp_path / "a", 100, "step 6: file a")
    assert (tmp_path / "a").stat().st_size == 101  # no further than one byte past the size
    with pytest.raises(Error, match=r"step 6: file b is gone from the store \(the step changed while it was read\)"):
        download_capped(fs, key + "-gone", tmp_path / "b", 100, "step 6: file b")


def test_ranks_of_one_job_must_share_a_save_tag(url, tmp_path):
    reader = open_checkpoints(url, rank=1, world_size=2, staging=tmp_path)  # reading needs none
    assert reader.list() == []
    with pytest.raises(ValueError, match="the ranks of a job save with their common save_tag"):
        reader.save(3, {}, {"rng": {"r": torch.zeros(1)}})


from hypothesis import given, settings, strategies as st  # noqa: E402

_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=30), inner,
                                                                                     max_size=3), max_leaves=15)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(["format", "version", "step", "world_size", "save_id", "folder",
                                                "files"]), _values, max_size=3),
       names=st.dictionaries(st.text(max_size=40), _values, max_size=3))
def test_any_manifest_parses_to_a_checked_one_or_a_checkpoint_error(changes, names):
    from rtrain._remote import ObjectPath
    from rtrain.checkpoint.objects import parse_manifest

    manifest = {"format": "rtrain-checkpoint", "version": 1, "step": 3, "world_size": 2, "save_id": "t-3-1",
                "folder": "t-3-1", "files": {"meta.json": {"sha256": "0" * 64, "size": 2}, **names}, **changes}
    try:
        parsed = parse_manifest(ObjectPath("memory://b/run/step-000000003"), json.dumps(manifest).encode())
    except CheckpointError:
        return
    for name in parsed["files"]:  # what passes is only what rtrain writes: short ASCII parts, no escape
        assert name.isascii() and ".." not in name.split("/") and len(name.encode()) < 255 * 2
