"""Checkpoints in an object store (checkpoint.dir=s3://bucket/run/checkpoints, or another fsspec URL): the same
layout, verification, keep-k pruning and damage policy as on disk, without a filesystem that every node mounts.

Commit protocol (no rename in an object store, so the manifest is the commit):
- every rank writes its files to local staging (hashed as they are written), uploads them to
  `<url>/step-N/rank-r/` (rank 0 also `shared/`), then uploads `rank-r/DONE` listing them with the save's id;
- rank 0 waits for every rank's DONE carrying this save's id, uploads meta.json, then MANIFEST.json last:
  a step without a manifest (an upload cut short, a killed rank) does not exist for list(), latest() or a
  resume, and a later save of that step writes over it;
- the other ranks return once their DONE is uploaded (rank 0 alone knows whether the step was published: its
  wait() raises when the run's last checkpoint was not).
A store that fails during a save is retried with backoff for checkpoint.upload_retry_s; after that the step is
given up, unpublished (one warning), and training goes on: a later save publishes a later step.
The save id is the same on every rank without asking anyone: the attempt's token (the stall watchdog's,
broadcast at start), the step and the count of saves of this manager. A DONE left by a killed attempt never
counts for a later one.

Loading downloads the manifest and every file it lists into local staging (a reader of the weights only, e.g.
`rtrain eval`: the shared ones), checks each against the manifest's size and sha256, and loads from there.
A file that fails (a flipped byte in the bucket) makes the checkpoint damaged: the manager falls back to an
older one, and a resume moves the damaged step to `<url>/damaged/step-N-<id>/` (copy, then delete).

With checkpoint.async_save the upload runs in the background thread: training blocks only for the snapshot.
Credentials come from the standard environment (AWS_*), never from the recipe.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from rtrain._remote import ObjectPath, filesystem
from rtrain.checkpoint import damage, files
from rtrain.checkpoint.commit import Poller, SaveJob
from rtrain.checkpoint.files import (
    DONE_NAME,
    MANIFEST_NAME,
    META_NAME,
    SHARED_DIR,
    CheckpointError,
    FileDigest,
)
from rtrain.checkpoint.manager import CheckpointManager, Loaded, loaded_from

logger = logging.getLogger("rtrain.checkpoint")


class RemoteCheckpointManager(CheckpointManager):
    """CheckpointManager over an object-store URL; `staging` is a local folder of this node."""

    def __init__(self, url: str, keep: int | None = 3, rank: int = 0, world_size: int = 1,
                 async_save: bool = False, finalize_timeout_s: float = 600, *, staging: str | os.PathLike,
                 save_tag: str = "", storage_options: dict[str, Any] | None = None,
                 retry_s: float = 300.0) -> None:
        self.url = ObjectPath(url)
        self.retry_s = float(retry_s)
        self.unpublished: CheckpointError | None = None  # the newest save, when it could not be published
        self.staging = Path(staging)
        self.save_tag = save_tag or uuid.uuid4().hex[:12]
        self.storage_options = storage_options
        self._saves = 0
        self.last_upload: dict[str, float] = {}  # seconds, bytes and files of the newest upload
        super().__init__(self.url, keep, rank, world_size, async_save, finalize_timeout_s)
        self.root = self.url  # what messages name

    def _open_root(self) -> None:
        try:
            self.fs, self.base = filesystem(self.url, self.storage_options)
        except (ImportError, ValueError) as exc:
            raise CheckpointError(f"checkpoint.dir {self.url}: no fsspec backend for it ({exc})") from exc
        self.base = self.base.rstrip("/")

    # ------------------------------------------------------------------------------------------- objects

    def _key(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _put(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(rel), data)

    def _get(self, rel: str) -> bytes | None:
        # fsspec's listings cache (filled by a listing in another thread: list()) would answer "not found" for
        # an object written since, without asking the store.
        self.fs.invalidate_cache(self._key(rel).rsplit("/", 1)[0])
        try:
            return self.fs.cat_file(self._key(rel))
        except FileNotFoundError:
            return None

    def _listing(self, prefix: str = "") -> dict[str, int]:
        """Every object under the root (or a prefix of it): relative name -> size, fresh from the store."""
        self.fs.invalidate_cache()
        where = self._key(prefix) if prefix else self.base
        try:
            found = self.fs.find(where, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(self.base) + 1:]: int(info.get("size") or 0) for name, info in found.items()
                if info.get("type", "file") == "file"}

    # -------------------------------------------------------------------------------------------- saving

    def _prepare(self, step: int, shared: Any, per_rank: Any, meta: Any) -> SaveJob:
        job = super()._prepare(step, shared, per_rank, meta)
        self._saves += 1
        job.save_id = f"{self.save_tag}-{step}-{self._saves}"
        return job

    def wait(self) -> None:
        """Until the newest save is complete; raises when it was given up (the run's last checkpoint must
        publish: a save during training may be given up, with a warning, and training goes on)."""
        self._finish_pending()
        if self.unpublished is not None:
            raise self.unpublished

    def _write(self, job: SaveJob) -> None:
        """Upload, retried with backoff for retry_s while the store fails; given up after that (unpublished:
        no manifest, so nothing half-visible), with one warning, not an exception: training goes on."""
        step_name = files.step_dir_name(job.step)
        deadline, delay, tries = time.monotonic() + self.retry_s, 1.0, 0
        while True:
            tries += 1
            try:
                self._write_once(job)
                self.unpublished = None
                if tries > 1:
                    logger.warning("published %s after %d tries", self.url / step_name, tries)
                return
            except _StoreFailure as failure:
                if time.monotonic() + delay > deadline:
                    error = failure.error
                    break
                logger.warning("%s: upload failed (%s); retrying in %.0f s", self.url / step_name, failure, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except CheckpointError as error_:  # the protocol's own (a rank that never finished): not retried
                error = error_
                break
        saved = self.list_quietly()
        newest = f"the newest published checkpoint is {saved[0]}" if saved else "no checkpoint is published yet"
        self.unpublished = CheckpointError(f"{self.url / step_name}: not published: {error} (tried {tries} "
                                           f"time(s) in {self.retry_s:g} s, checkpoint.upload_retry_s); {newest}")
        logger.warning("%s; training goes on", self.unpublished)

    def list_quietly(self) -> list[ObjectPath]:
        try:
            return self.list()
        except Exception:  # noqa: BLE001 - the store is away: nothing to name
            return []

    def _write_once(self, job: SaveJob) -> None:
        step_name = files.step_dir_name(job.step)
        stage = self.staging / f"{step_name}-{job.save_id}-rank{self.rank}"
        started = time.perf_counter()
        try:
            if self.rank == 0 and self._get(f"{step_name}/{MANIFEST_NAME}") is not None:
                # Another timeline's save of this step: unpublished first, so that no reader ever sees its
                # manifest over the files this save is about to write.
                logger.warning("replacing earlier %s", self.url / step_name)
                self.fs.rm_file(self._key(step_name, MANIFEST_NAME))
            written = self._upload_part(job, stage, step_name)
            if self.rank == 0:
                written.update(self._await_markers(step_name, job.save_id))
                meta = (json.dumps(job.meta, indent=2, sort_keys=True) + "\n").encode()
                self._put(f"{step_name}/{META_NAME}", meta)
                written[META_NAME] = FileDigest.of_bytes(meta)
                manifest = files.build_manifest(job.step, self.world_size, job.save_id, written)
                self._put(f"{step_name}/{MANIFEST_NAME}", (json.dumps(manifest, indent=2) + "\n").encode())
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - object stores raise many types; one line names the step
            raise _StoreFailure(CheckpointError(f"cannot upload the checkpoint ({type(error).__name__}: "
                                                f"{' '.join(str(error).split())[:300]})")) from error
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        seconds = time.perf_counter() - started
        uploaded = self.last_upload.get("bytes", 0)
        self.last_upload["seconds"] = seconds
        if self.rank == 0:
            logger.info("saved checkpoint %s (%d bytes from this rank, uploaded in %.2f s)", self.url / step_name,
                        uploaded, seconds)
            try:
                self._prune(job.step)
            except Exception as error:  # noqa: BLE001 - the checkpoint is published; pruning waits for the next
                logger.warning("%s: pruning older checkpoints failed (%s: %s); the next save tries again",
                               self.url, type(error).__name__, " ".join(str(error).split())[:200])

    def _upload_part(self, job: SaveJob, stage: Path, step_name: str) -> dict[str, FileDigest]:
        """This rank's files (and rank 0's shared ones), then its DONE: the files the manifest will list."""
        rank_dir = files.rank_dir_name(self.rank)
        written: dict[str, FileDigest] = {}
        groups = [(rank_dir, job.per_rank)] + ([(SHARED_DIR, job.shared)] if self.rank == 0 else [])
        for folder, states in groups:
            (stage / folder).mkdir(parents=True, exist_ok=True)
            for file_name, digest in files.write_state_files(stage / folder, states).items():
                written[f"{folder}/{file_name}"] = digest
        for name in written:
            self.fs.put_file(str(stage / name), self._key(step_name, name))
        listed = {name: digest.as_json() for name, digest in written.items() if name.startswith(rank_dir + "/")}
        marker = json.dumps({"save_id": job.save_id, "rank": self.rank, "files": listed}).encode()
        self._put(f"{step_name}/{rank_dir}/{DONE_NAME}", marker)
        self.last_upload = {"bytes": float(sum(d.size for d in written.values())), "files": float(len(written))}
        return {name: digest for name, digest in written.items() if name.startswith(SHARED_DIR + "/")}

    def _await_markers(self, step_name: str, save_id: str) -> dict[str, FileDigest]:
        pending, listed_files = set(range(self.world_size)), {}
        poller = Poller(self.finalize_timeout_s)
        while True:
            for rank in sorted(pending):
                marker_name = f"{files.rank_dir_name(rank)}/{DONE_NAME}"
                data = self._get(f"{step_name}/{marker_name}")
                marker = _parse_marker(data, save_id) if data is not None else None
                if marker is not None:
                    listed_files.update(marker)
                    listed_files[marker_name] = FileDigest.of_bytes(data)
                    pending.discard(rank)
            if not pending:
                return listed_files
            if poller.expired():
                raise CheckpointError(f"{self.url / step_name}: ranks {sorted(pending)} did not finish uploading "
                                      f"within {self.finalize_timeout_s:g} s; did every rank call save()?")
            poller.sleep()

    def _prune(self, saved_step: int) -> None:
        saved_name = files.step_dir_name(saved_step)
        if self.keep is None:
            return
        older = [path for path in self.list() if path.name < saved_name]
        for old in older[self.keep - 1:]:
            logger.info("pruning %s (keep=%d)", old, self.keep)
            self._remove(old.name)
        published = {path.name for path in self.list()}
        for step_name in {name.split("/", 1)[0] for name in self._listing()}:  # unpublished leftovers
            if files.STEP_DIR_PATTERN.fullmatch(step_name) and step_name < saved_name and \
                    step_name not in published:
                logger.info("removing abandoned %s", self.url / step_name)
                self._remove(step_name)

    def _remove(self, step_name: str) -> None:
        """The manifest first: a half-deleted step is never one that passes for published."""
        try:
            self.fs.rm_file(self._key(step_name, MANIFEST_NAME))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self._key(step_name), recursive=True)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------------------- reading

    def list(self) -> list[ObjectPath]:  # type: ignore[override]
        """Published steps (those with a manifest), newest first; not verified, see latest()."""
        steps = set()
        for name in self._listing():
            step_name, _, rest = name.partition("/")
            if rest == MANIFEST_NAME and files.STEP_DIR_PATTERN.fullmatch(step_name):
                steps.add(step_name)
        return [self.url / name for name in sorted(steps, reverse=True)]

    def load(self, path: str | os.PathLike, shared_only: bool = False) -> Loaded:
        path = ObjectPath(str(path))
        local = self.staging / f"load-{uuid.uuid4().hex[:8]}" / path.name
        try:
            return self._load_via(path, local, shared_only)
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)

    def _load_via(self, path: ObjectPath, local: Path, shared_only: bool) -> Loaded:
        step_name = path.name
        data = self._get(f"{step_name}/{MANIFEST_NAME}")
        if data is None:
            raise CheckpointError(f"{path}: missing {MANIFEST_NAME}")
        local.mkdir(parents=True)
        if len(data) > files.MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: unreadable {MANIFEST_NAME}: over {files.MAX_JSON_BYTES >> 20} MiB")
        (local / MANIFEST_NAME).write_bytes(data)
        manifest = _renamed(path, local, lambda: files.read_manifest(local))
        _renamed(path, local, lambda: files.check_step_name(local, manifest))
        sizes = self._listing(step_name)
        for name, entry in manifest["files"].items():
            size = sizes.get(f"{step_name}/{name}")
            if size is None:
                raise CheckpointError(f"{path}: missing file {name}")
            if size != entry["size"]:
                raise CheckpointError(f"{path}: file {name} has {size} bytes, manifest says {entry['size']} "
                                      "(truncated?)")
        # Every rank reads every file, as on disk: ranks that verified different files could resume different
        # steps. Past the shared states the other ranks' files are small (RNG streams, loader positions), or,
        # for ZeRO shards, together the size of the optimizer state that one rank holds otherwise.
        wanted = manifest["files"] if not shared_only else {
            name: entry for name, entry in manifest["files"].items()
            if name == META_NAME or name.rpartition("/")[0] == SHARED_DIR}
        self._download(step_name, local, wanted)
        checked = {**manifest, "files": wanted}
        _renamed(path, local, lambda: files.verify_files(local, checked))
        loaded = _renamed(path, local, lambda: loaded_from(local, checked, self.rank, shared_only))
        loaded.path = path
        return loaded

    def meta_of(self, path: str) -> dict[str, Any]:
        """meta.json of a published checkpoint (unverified: for a look at its recipe before any state loads)."""
        step_name = ObjectPath(str(path)).name
        data = self._get(f"{step_name}/{META_NAME}")
        if data is None or len(data) > files.MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: no readable {META_NAME}")
        meta = json.loads(data.decode())
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: {META_NAME} is not a JSON object")
        return meta

    def _download(self, step_name: str, local: Path, wanted: dict[str, Any]) -> None:
        for name in wanted:
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._key(step_name, name), str(target))

    def per_rank_states_of(self, loaded: Loaded, rank: int) -> dict[str, Any]:
        if not 0 <= rank < loaded.world_size:
            raise CheckpointError(f"{loaded.path}: written by {loaded.world_size} ranks, has no rank {rank}")
        path = ObjectPath(str(loaded.path))
        local = self.staging / f"load-{uuid.uuid4().hex[:8]}" / path.name
        try:
            data = self._get(f"{path.name}/{MANIFEST_NAME}")
            if data is None:
                raise CheckpointError(f"{path}: missing {MANIFEST_NAME}")
            local.mkdir(parents=True)
            (local / MANIFEST_NAME).write_bytes(data)
            manifest = _renamed(path, local, lambda: files.read_manifest(local))
            folder = files.rank_dir_name(rank)
            names = {n: e for n, e in manifest["files"].items() if n.rpartition("/")[0] == folder}
            self._download(path.name, local, names)
            _renamed(path, local, lambda: files.verify_files(local, {**manifest, "files": names}))
            return {n.rpartition("/")[2][: -len(files.STATE_SUFFIX)]: files.load_torch_file(local, n)
                    for n in names if n.endswith(files.STATE_SUFFIX)}
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)

    def _set_aside(self, path: Path, reason: str) -> None:
        """A damaged step to `<url>/damaged/step-N/` (copied, then deleted: no rename here), with its reason."""
        step_name = ObjectPath(str(path)).name
        target = f"{damage.DAMAGED_DIR}/{step_name}-{uuid.uuid4().hex[:8]}"
        for name in self._listing(step_name):
            self.fs.copy(self._key(name), self._key(target, name.split("/", 1)[1]))
        self._put(f"{target}.reason", (reason + "\n").encode())
        self._remove(step_name)
        logger.warning("moved damaged checkpoint %s to %s (%s)", path, self.url / target, reason)


class _StoreFailure(Exception):
    """The object store failed during a save (retried); `error` says how, in one line."""

    def __init__(self, error: CheckpointError) -> None:
        super().__init__(str(error))
        self.error = error


def _parse_marker(data: bytes, save_id: str) -> dict[str, FileDigest] | None:
    try:
        done = json.loads(data.decode())
        if not isinstance(done, dict) or done.get("save_id") != save_id:
            return None
        return {name: FileDigest(entry["sha256"], entry["size"]) for name, entry in done["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _renamed(remote: ObjectPath, local: Path, call: Any) -> Any:
    """Run `call`; a CheckpointError it raises names the object-store location, not the local staging copy."""
    try:
        return call()
    except CheckpointError as error:
        raise CheckpointError(str(error).replace(str(local), str(remote))) from None
