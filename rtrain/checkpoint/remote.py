"""Checkpoints in an object store (checkpoint.dir=s3://bucket/run/checkpoints, or another fsspec URL): the same
verification, keep-k pruning and damage policy as on disk, without a filesystem that every node mounts.

Layout (no rename in an object store, so the manifest is the commit; docs/architecture.md has the why):
    step-N/MANIFEST.json                  the commit: names the save (its id) whose files make the step
    step-N/<save id>/shared/<name>.pt     rank 0's; rank-r/<name>.pt and rank-r/DONE: rank r's; meta.json
Every rank stages its files locally (hashed as written), uploads them into its save's folder, then its DONE
(the save id: the attempt's token, the step, the count of saves; the same on every rank without asking).
Rank 0 waits for every DONE of this save, checks what they list and that it is all in the store, uploads
meta.json, then puts MANIFEST.json: one put that publishes the step, or replaces an earlier save of it which
stayed published until then. A save cut short leaves a folder no manifest names: invisible, pruned later.
A store failing during a save is retried with backoff for checkpoint.upload_retry_s, then the step is given
up, unpublished, with one warning (wait() raises: the run's last checkpoint must publish); a staging disk
that fails is not a store outage: the save fails at once. Loading reads the manifest (capped, checked), then
downloads the files (never past their listed size) and verifies them as on disk; a damaged step is copied
to `<url>/damaged/step-N-<id>/` and deleted. Steps of the first remote layout (files under step-N/ itself,
no "folder" in the manifest) are read too. Credentials come from the environment (AWS_*), never the recipe.
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
from rtrain.checkpoint.manager import CheckpointManager, Loaded, loaded_from, storage_failure
from rtrain.checkpoint.objects import (StoreFailure, check_listed, download_capped, files_folder, parse_manifest,
                                      parse_marker, renamed)

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
        self.tag_given = bool(save_tag)  # a job of several ranks saves only with their common tag
        self.save_tag = save_tag or uuid.uuid4().hex[:12]
        if not files.SAVE_ID_PATTERN.fullmatch(f"{self.save_tag}-0-0"):
            raise ValueError(f"save_tag {save_tag!r}: use letters, digits, '_', '-', '.'")
        self.storage_options = storage_options
        self._saves = 0
        self._manifests: dict[str, dict] = {}  # the newest loaded step's manifest: its other ranks' files
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
        """A small object (a manifest, a DONE, meta.json), read no further than files.MAX_JSON_BYTES."""
        limit = files.MAX_JSON_BYTES
        # fsspec's listings cache (filled by a listing in another thread: list()) would answer "not found" for
        # an object written since, without asking the store.
        self.fs.invalidate_cache(self._key(rel).rsplit("/", 1)[0])
        try:
            data = self.fs.cat_file(self._key(rel), start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise CheckpointError(f"{self.url / rel}: over {limit >> 20} MiB, not a file rtrain wrote")
        return data

    def _listing(self, prefix: str = "") -> dict[str, int]:
        """Every object under the root (or a prefix of it): relative name -> size, fresh from the store."""
        self.fs.invalidate_cache()
        where = self._key(prefix) if prefix else self.base
        try:
            found = self.fs.find(where, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(self.base) + 1:]: int(info.get("size") or 0) for name, info in found.items()
                if info.get("type", "file") == "file" and name.startswith(self.base + "/")}

    # -------------------------------------------------------------------------------------------- saving

    def _prepare(self, step: int, shared: Any, per_rank: Any, meta: Any) -> SaveJob:
        if not self.tag_given and self.world_size > 1:  # each rank would draw its own: DONEs waited for in vain
            raise ValueError("RemoteCheckpointManager: the ranks of a job save with their common save_tag")
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
        """Stage, then upload, retried with backoff for retry_s while the store fails; given up after that
        (unpublished: no manifest, so nothing half-visible), with one warning, not an exception: training goes
        on. A staging folder that cannot take the files fails the save at once (a local disk, not the store)."""
        step_name = files.step_dir_name(job.step)
        stage = self.staging / f"{step_name}-{job.save_id}-rank{self.rank}"
        try:
            try:
                written = self._stage(job, stage)
            except (OSError, RuntimeError) as error:
                cause = storage_failure(self.staging, error) or f"{type(error).__name__}: {error}"
                raise CheckpointError(f"{self.url / step_name}: cannot stage the checkpoint in {self.staging} "
                                      f"(a local folder, before the upload): {cause}") from None
            self._upload_with_retries(job, stage, written)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _upload_with_retries(self, job: SaveJob, stage: Path, written: dict[str, FileDigest]) -> None:
        step_name = files.step_dir_name(job.step)
        started = time.monotonic()
        deadline, delay, tries = started + self.retry_s, 1.0, 0
        while True:
            tries += 1
            try:
                self._upload(job, stage, written)
                self.unpublished = None
                if tries > 1:
                    logger.warning("published %s after %d tries", self.url / step_name, tries)
                return
            except StoreFailure as failure:
                if time.monotonic() + delay > deadline:
                    error = failure.error
                    break
                logger.warning("%s: upload failed (%s); retrying in %.0f s", self.url / step_name, failure, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except CheckpointError as error_:  # the protocol's own (a rank that never finished): not retried
                error = error_
                break
        try:
            saved = self.list()
        except Exception:  # noqa: BLE001 - the store is away: nothing to name
            saved = []
        newest = f"the newest published checkpoint is {saved[0]}" if saved else "no checkpoint is published yet"
        self.unpublished = CheckpointError(
            f"{self.url / step_name}: not published: {error} (tried {tries} time(s) over "
            f"{time.monotonic() - started:.0f} s; checkpoint.upload_retry_s={self.retry_s:g}); {newest}")
        logger.warning("%s; training goes on", self.unpublished)

    def _stage(self, job: SaveJob, stage: Path) -> dict[str, FileDigest]:
        """This rank's files (and rank 0's shared ones) written to the staging folder: name -> digest."""
        shutil.rmtree(stage, ignore_errors=True)
        written: dict[str, FileDigest] = {}
        groups = [(files.rank_dir_name(self.rank), job.per_rank)] + (
            [(SHARED_DIR, job.shared)] if self.rank == 0 else [])
        for folder, states in groups:
            (stage / folder).mkdir(parents=True, exist_ok=True)
            for file_name, digest in files.write_state_files(stage / folder, states).items():
                written[f"{folder}/{file_name}"] = digest
        return written

    def _upload(self, job: SaveJob, stage: Path, written: dict[str, FileDigest]) -> None:
        step_name = files.step_dir_name(job.step)
        folder = f"{step_name}/{job.save_id}"
        rank_dir = files.rank_dir_name(self.rank)
        started = time.perf_counter()
        try:
            for name in written:
                self.fs.put_file(str(stage / name), self._key(folder, name))
            listed = {name: d.as_json() for name, d in written.items() if name.startswith(rank_dir + "/")}
            marker = json.dumps({"save_id": job.save_id, "rank": self.rank, "files": listed}).encode()
            self._put(f"{folder}/{rank_dir}/{DONE_NAME}", marker)
            self.last_upload = {"bytes": float(sum(d.size for d in written.values())), "files": float(len(written))}
            if self.rank == 0:
                published = {name: d for name, d in written.items() if name.startswith(SHARED_DIR + "/")}
                published.update(self._await_markers(step_name, job.save_id))
                meta = (json.dumps(job.meta, indent=2, sort_keys=True) + "\n").encode()
                self._put(f"{folder}/{META_NAME}", meta)
                published[META_NAME] = FileDigest.of_bytes(meta)
                manifest = {**files.build_manifest(job.step, self.world_size, job.save_id, published),
                            "folder": job.save_id}
                self._check_before_publishing(manifest, step_name, folder)
                self._put(f"{step_name}/{MANIFEST_NAME}", (json.dumps(manifest, indent=2) + "\n").encode())
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - object stores raise many types; one line names the step
            raise StoreFailure(CheckpointError(f"cannot upload the checkpoint ({type(error).__name__}: "
                                                f"{' '.join(str(error).split())[:300]})")) from error
        seconds = time.perf_counter() - started
        self.last_upload["seconds"] = seconds
        if self.rank == 0:
            logger.info("saved checkpoint %s (%d bytes from this rank, uploaded in %.2f s)", self.url / step_name,
                        self.last_upload["bytes"], seconds)
            try:
                self._prune(job.step, job.save_id)
            except Exception as error:  # noqa: BLE001 - the checkpoint is published; pruning waits for the next
                logger.warning("%s: pruning older checkpoints failed (%s: %s); the next save tries again",
                               self.url, type(error).__name__, " ".join(str(error).split())[:200])

    def _check_before_publishing(self, manifest: dict, step_name: str, folder: str) -> None:
        """A step that could not load is never published (pruning would count it and delete good older steps):
        the manifest as a reader checks it, every file it lists in the store with its size, and every rank's
        DONE still the one it was built from."""
        problem = files.manifest_problem(manifest)
        if problem:
            raise CheckpointError(f"the manifest it would publish is bad: {problem}")
        self._check_in_store(self.url / step_name, manifest)
        for name, entry in manifest["files"].items():
            if name.endswith("/" + DONE_NAME):
                data = self._get(f"{folder}/{name}")
                if data is None or FileDigest.of_bytes(data) != FileDigest(entry["sha256"], entry["size"]):
                    raise CheckpointError(f"{self.url / folder / name} changed while the step was being published")

    def _await_markers(self, step_name: str, save_id: str) -> dict[str, FileDigest]:
        pending, listed_files = set(range(self.world_size)), {}
        poller = Poller(self.finalize_timeout_s)
        while True:
            for rank in sorted(pending):
                marker_name = f"{files.rank_dir_name(rank)}/{DONE_NAME}"
                data = self._get(f"{step_name}/{save_id}/{marker_name}")
                where = self.url / step_name / save_id / marker_name
                marker = parse_marker(data, save_id, rank, self.world_size, where) if data is not None else None
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

    def _prune(self, saved_step: int, save_id: str) -> None:
        """Older published steps past `keep` (one that fails the cheap checks is set aside, not counted), and
        what no manifest names at or below the saved step: earlier saves of a step, saves cut short."""
        saved_name = files.step_dir_name(saved_step)
        listing = self._listing()
        steps = {name.split("/", 1)[0] for name in listing if files.STEP_DIR_PATTERN.fullmatch(name.split("/")[0])}
        live, kept, gone = {saved_name: save_id}, [], set()
        for step_name in sorted((s for s in steps if s < saved_name), reverse=True):
            if f"{step_name}/{MANIFEST_NAME}" not in listing:
                continue
            try:  # the save's own listing, fresh: another writer may have published a newer save of the step
                manifest = self._manifest(self.url / step_name)
                self._check_in_store(self.url / step_name, manifest)
            except CheckpointError as error:
                self._set_aside(self.url / step_name, str(error))
                gone.add(step_name)
                continue
            live[step_name] = manifest.get("folder") or "*"  # "*": the first layout, files under step-N/
            kept.append(step_name)
        for step_name in kept[self.keep - 1:] if self.keep is not None else ():
            logger.info("pruning %s (keep=%d)", self.url / step_name, self.keep)
            self._remove(step_name)
            gone.add(step_name)
        for step_name in sorted(s for s in steps if s <= saved_name and s not in gone and live.get(s) != "*"):
            for folder in sorted({name.split("/")[1] for name in listing if name.startswith(step_name + "/")
                                  and name.count("/") >= 2} - {live.get(step_name)}):
                logger.info("removing %s (no manifest names it)", self.url / step_name / folder)
                try:
                    self.fs.rm(self._key(step_name, folder), recursive=True)
                except FileNotFoundError:  # gone meanwhile
                    pass

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

    def _manifest(self, path: str | os.PathLike) -> dict[str, Any]:
        """The checked manifest of a step of this root (another location is refused, not read as ours)."""
        path = ObjectPath(str(path))
        if path.parent != self.url or not files.STEP_DIR_PATTERN.fullmatch(path.name):
            raise CheckpointError(f"{path}: not a checkpoint step of {self.url}")
        data = self._get(f"{path.name}/{MANIFEST_NAME}")
        if data is None:
            raise CheckpointError(f"{path}: missing {MANIFEST_NAME}")
        manifest = parse_manifest(path, data)
        return manifest

    def load(self, path: str | os.PathLike, shared_only: bool = False) -> Loaded:
        manifest = self._manifest(path)
        path = ObjectPath(str(path))
        wanted = manifest["files"] if not shared_only else {
            name: entry for name, entry in manifest["files"].items()
            if name == META_NAME or name.rpartition("/")[0] == SHARED_DIR}
        # Every rank reads every file, as on disk (ranks that verified different files could resume different
        # steps); past the shared states they are small, or for ZeRO shards one optimizer state in all.
        local = self.staging / f"load-{uuid.uuid4().hex[:8]}" / path.name
        try:
            self._fetch(path, manifest, wanted, local)
            loaded = renamed(path, local, lambda: loaded_from(local, {**manifest, "files": wanted}, self.rank,
                                                               shared_only))
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)
        loaded.path = path
        self._manifests = {str(path): manifest}
        return loaded

    def _check_in_store(self, path: ObjectPath, manifest: dict) -> str:
        """Every file of the manifest in a fresh listing of its save's folder, with its size; that folder."""
        check_listed(path, manifest, self._listing(folder := files_folder(path, manifest)))
        return folder

    def _fetch(self, path: ObjectPath, manifest: dict, wanted: dict[str, Any], local: Path) -> None:
        """Download `wanted` files of a step to `local` and verify them; every listed file must be in the
        store with its size first (cheap, and a step missing a rank's files is damaged for every rank)."""
        folder = self._check_in_store(path, manifest)
        local.mkdir(parents=True)
        for name, entry in wanted.items():
            download_capped(self.fs, self._key(folder, name), local / name, entry["size"], f"{path}: file {name}")
        renamed(path, local, lambda: files.verify_files(local, {**manifest, "files": wanted}))

    def meta_of(self, path: str) -> dict[str, Any]:
        """meta.json of a published checkpoint, checked against its manifest (for a look at its recipe before
        any state loads)."""
        manifest = self._manifest(path)
        entry = manifest["files"].get(META_NAME)
        if entry is None:
            return {}
        data = self._get(f"{files_folder(ObjectPath(str(path)), manifest)}/{META_NAME}")
        if data is None or FileDigest.of_bytes(data) != FileDigest(entry["sha256"], entry["size"]):
            raise CheckpointError(f"{path}: {META_NAME} is missing or fails its sha256 check")
        try:
            meta = json.loads(data.decode())
        except (ValueError, RecursionError) as error:
            raise CheckpointError(f"{path}: unreadable {META_NAME}: {str(error)[:200]}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: {META_NAME} is not a JSON object")
        return meta

    def per_rank_states_of(self, loaded: Loaded, rank: int) -> dict[str, Any]:
        if not 0 <= rank < loaded.world_size:
            raise CheckpointError(f"{loaded.path}: written by {loaded.world_size} ranks, has no rank {rank}")
        path = ObjectPath(str(loaded.path))
        manifest = self._manifests.get(str(path)) or self._manifest(path)  # the save that was loaded
        folder = files.rank_dir_name(rank)
        names = {n: e for n, e in manifest["files"].items() if n.rpartition("/")[0] == folder}
        local = self.staging / f"load-{uuid.uuid4().hex[:8]}" / path.name
        try:
            self._fetch(path, manifest, names, local)
            return {n.rpartition("/")[2][: -len(files.STATE_SUFFIX)]: files.load_torch_file(local, n)
                    for n in names if n.endswith(files.STATE_SUFFIX)}
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)

    def _set_aside(self, path: Path, reason: str) -> None:
        """A damaged step to `<url>/damaged/step-N-<id>/` (copied, then deleted: no rename here), with its reason."""
        step_name = ObjectPath(str(path)).name
        target = f"{damage.DAMAGED_DIR}/{step_name}-{uuid.uuid4().hex[:8]}"
        for name in self._listing(step_name):
            self.fs.copy(self._key(name), self._key(target, name.split("/", 1)[1]))
        self._put(f"{target}.reason", (reason + "\n").encode())
        self._remove(step_name)
        logger.warning("moved damaged checkpoint %s to %s (%s)", path, self.url / target, reason)
