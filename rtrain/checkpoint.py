"""Atomic, verified, keep-k checkpoints written by every rank of a job without collectives.

Layout under `root`:
    step-{N:09d}/shared/<name>.pt      written once, by rank 0
    step-{N:09d}/rank-{r:05d}/<name>.pt  written by rank r (RNG streams, loader position, ZeRO shards)
    step-{N:09d}/rank-{r:05d}/DONE     rank r's list of its files with sha256 + size
    step-{N:09d}/meta.json             small JSON (resolved recipe, MLflow run id, epoch, ...)
    step-{N:09d}/MANIFEST.json         sha256 + size of every file, world_size, step, format version

Protocol (works on a shared filesystem and inside a background thread, hence no collectives):
rank 0 clears any leftover `.tmp-step-N` of a crashed run and opens a fresh one holding a random
SAVE_ID; every rank reads that id, writes + fsyncs its files in `rank-r/` and then a DONE marker
carrying the id; rank 0 waits for world_size markers with *its* id (so markers left by a crashed run
never count), writes meta.json and MANIFEST.json, fsyncs, renames the dir to `step-N`, fsyncs the
root and only then prunes to the newest `keep`. A rank that finds the SAVE_ID replaced under it
(it read a crashed run's id before rank 0 arrived) rewrites its part; other ranks return only once
`step-N` holds a manifest with their id, so a load right after save sees it on every rank.

Every rank must call save() for every checkpointed step; `shared` and `meta` are only read on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtrain import checkpoint_io, checkpoint_snapshot
from rtrain.checkpoint_io import (
    DONE_NAME,
    MANIFEST_NAME,
    META_NAME,
    SHARED_DIR,
    STATE_SUFFIX,
    CheckpointError,
    FileDigest,
    Poller,
    UnsafeStateError,
)

__all__ = ["CheckpointError", "CheckpointManager", "Loaded", "UnsafeStateError"]

logger = logging.getLogger("rtrain.checkpoint")

_STEP_DIR_PATTERN = re.compile(r"step-(\d{9})")
_TMP_DIR_PATTERN = re.compile(r"\.tmp-step-(\d{9})")
_SCRATCH_PREFIXES = (".trash-", ".staging-")


@dataclass
class Loaded:
    step: int
    path: Path
    shared: dict[str, Any]
    per_rank: dict[str, Any]  # this rank's states only
    meta: dict[str, Any]
    world_size: int = 1  # the world size the checkpoint was written with


@dataclass
class _SaveJob:
    step: int
    shared: dict[str, Any]
    per_rank: dict[str, Any]
    meta: dict[str, Any]


class CheckpointManager:
    def __init__(
        self,
        root: str | os.PathLike,
        keep: int | None = 3,
        rank: int = 0,
        world_size: int = 1,
        async_save: bool = False,
        finalize_timeout_s: float = 600,
    ) -> None:
        if keep is not None and (type(keep) is not int or keep < 1):
            raise ValueError(f"CheckpointManager keep must be an int >= 1 or None (keep all), got {keep!r}")
        if type(world_size) is not int or world_size < 1:
            raise ValueError(f"CheckpointManager world_size must be an int >= 1, got {world_size!r}")
        if type(rank) is not int or not 0 <= rank < world_size:
            raise ValueError(f"CheckpointManager rank must be in [0, {world_size}), got {rank!r}")
        if not finalize_timeout_s > 0:
            raise ValueError(f"CheckpointManager finalize_timeout_s must be > 0, got {finalize_timeout_s!r}")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.async_save = async_save
        self.finalize_timeout_s = float(finalize_timeout_s)
        self.last_save_blocking_s = 0.0  # how long the latest save() held up its caller
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rtrain-ckpt") if async_save else None
        self._snapshot_buffers = checkpoint_snapshot.SnapshotBuffers() if async_save else None
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------
    # public API

    def save(
        self,
        step: int,
        shared: dict[str, Any],
        per_rank: dict[str, Any] | None = None,
        meta: dict | None = None,
    ) -> None:
        started = time.perf_counter()
        self.wait()
        job = self._prepare(step, shared, per_rank, meta)
        if self._executor is None:
            self._write(job)
        else:
            self._pending = self._executor.submit(self._write, job)
            self._pending_step = step
        self.last_save_blocking_s = time.perf_counter() - started

    def wait(self) -> None:
        pending, step = self._pending, self._pending_step
        self._pending, self._pending_step = None, None
        if pending is None:
            return
        try:
            pending.result()
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"{self.root / checkpoint_io.step_dir_name(step)}: background save failed: {error}"
            ) from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._snapshot_buffers = checkpoint_snapshot.SnapshotBuffers()  # release the host copies

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def list(self) -> list[Path]:
        """Complete (renamed) step dirs, newest first; not verified, see latest()."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR_PATTERN.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return [path for _, path in sorted(found, reverse=True)]

    def latest(self) -> Loaded | None:
        """Newest checkpoint that verifies, falling back to older ones past damaged ones."""
        skipped = []
        for path in self.list():
            try:
                loaded = self.load(path)
            except CheckpointError as error:
                logger.warning("skipping checkpoint %s: %s", path, error)
                skipped.append(path.name)
                continue
            because = f" (newer ones failed verification: {', '.join(skipped)})" if skipped else ""
            logger.info("using checkpoint %s, step %d%s", path, loaded.step, because)
            return loaded
        if skipped:
            logger.warning("no usable checkpoint in %s: all of %s failed verification", self.root, skipped)
        else:
            logger.info("no checkpoint in %s", self.root)
        return None

    def load(self, path: str | os.PathLike) -> Loaded:
        """Verify every file against the manifest, then load shared states and this rank's own."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        manifest = checkpoint_io.read_manifest(path)
        name_match = _STEP_DIR_PATTERN.fullmatch(path.name)
        if name_match and int(name_match.group(1)) != manifest["step"]:
            raise CheckpointError(
                f"{path}: {MANIFEST_NAME} says step {manifest['step']}, directory name disagrees"
            )
        checkpoint_io.verify_files(path, manifest)
        own_dir = checkpoint_io.rank_dir_name(self.rank)
        shared: dict[str, Any] = {}
        per_rank: dict[str, Any] = {}
        for name in manifest["files"]:
            folder, _, file_name = name.rpartition("/")
            if not file_name.endswith(STATE_SUFFIX):
                continue
            state_name = file_name[: -len(STATE_SUFFIX)]
            if folder == SHARED_DIR:
                shared[state_name] = checkpoint_io.load_torch_file(path, name)
            elif folder == own_dir:
                per_rank[state_name] = checkpoint_io.load_torch_file(path, name)
        meta = checkpoint_io.read_meta(path, manifest)
        if manifest["world_size"] != self.world_size:
            logger.warning(
                "%s was written by %d ranks, this job has %d: rank %d gets %s per-rank states",
                path, manifest["world_size"], self.world_size, self.rank, "its" if per_rank else "no",
            )
        return Loaded(manifest["step"], path, shared, per_rank, meta, manifest["world_size"])

    # ------------------------------------------------------------------------------------------
    # preparation (runs in the caller's thread)

    def _prepare(self, step: int, shared: Any, per_rank: Any, meta: Any) -> _SaveJob:
        if type(step) is not int or step < 0:
            raise CheckpointError(f"checkpoint step must be an int >= 0, got {step!r}")
        buffers = self._snapshot_buffers  # async: the caller may mutate its tensors once save() returns
        shared_states: dict[str, Any] = {}
        meta_state: dict[str, Any] = {}
        if self.rank == 0:
            shared_states = self._snapshot_group("shared", shared, buffers)
            if meta is not None and type(meta) is not dict:
                raise CheckpointError(f"meta must be a dict, got {type(meta).__qualname__}")
            checkpoint_snapshot.check_json_state(meta or {}, "meta")
            meta_state = json.loads(json.dumps(meta or {}))  # a private copy, written later
        per_rank_states = self._snapshot_group("per_rank", per_rank or {}, buffers)
        if buffers is not None:
            buffers.finish()
        return _SaveJob(step, shared_states, per_rank_states, meta_state)

    @staticmethod
    def _snapshot_group(group: str, states: Any, buffers: checkpoint_snapshot.SnapshotBuffers | None) -> dict[str, Any]:
        if not isinstance(states, dict):
            raise CheckpointError(f"{group} must be a dict of name -> state, got {type(states).__qualname__}")
        snapshots = {}
        for name, state in states.items():
            checkpoint_io.check_state_name(name, group)
            snapshots[name] = checkpoint_snapshot.snapshot_state(state, f"{group}[{name!r}]", buffers)
        return snapshots

    # ------------------------------------------------------------------------------------------
    # writing (runs in the caller's thread or the background thread)

    def _write(self, job: _SaveJob) -> None:
        if self.rank == 0:
            self._write_as_leader(job)
        else:
            self._write_as_follower(job)

    def _write_as_leader(self, job: _SaveJob) -> None:
        tmp_dir = self.root / f".tmp-{checkpoint_io.step_dir_name(job.step)}"
        save_id = uuid.uuid4().hex
        self._open_tmp_dir(tmp_dir, save_id)
        files: dict[str, FileDigest] = {}
        shared_dir = tmp_dir / SHARED_DIR
        shared_dir.mkdir()
        for file_name, digest in checkpoint_io.write_state_files(shared_dir, job.shared).items():
            files[f"{SHARED_DIR}/{file_name}"] = digest
        self._write_rank_part(tmp_dir, save_id, job.per_rank)
        files.update(self._await_rank_markers(tmp_dir, save_id))
        files[META_NAME] = checkpoint_io.write_json_file(tmp_dir / META_NAME, job.meta)
        manifest = checkpoint_io.build_manifest(job.step, self.world_size, save_id, files)
        checkpoint_io.write_json_file(tmp_dir / MANIFEST_NAME, manifest)
        checkpoint_io.fsync_dir(tmp_dir)
        final_dir = self.root / checkpoint_io.step_dir_name(job.step)
        self._publish(tmp_dir, final_dir)
        logger.info("saved checkpoint %s (%d files, %d bytes)", final_dir, len(files),
                    sum(digest.size for digest in files.values()))
        self._prune(job.step)

    def _open_tmp_dir(self, tmp_dir: Path, save_id: str) -> None:
        """Replace any leftover tmp dir by a fresh one that appears atomically with its SAVE_ID."""
        if tmp_dir.exists():
            logger.info("removing leftover %s of an interrupted save", tmp_dir)
            checkpoint_io.remove_dir(tmp_dir)
        staging = self.root / f".staging-{save_id}"
        staging.mkdir()
        checkpoint_io.write_bytes_file(staging / checkpoint_io.SAVE_ID_NAME, save_id.encode())
        checkpoint_io.fsync_dir(staging)
        try:
            os.rename(staging, tmp_dir)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"{tmp_dir}: cannot open for writing ({error}); is another job saving into {self.root}?"
            ) from error

    def _write_rank_part(self, tmp_dir: Path, save_id: str, per_rank: dict[str, Any]) -> None:
        rank_dir = tmp_dir / checkpoint_io.rank_dir_name(self.rank)
        if rank_dir.exists():  # our own part from an attempt under a SAVE_ID that has since changed
            shutil.rmtree(rank_dir)
        os.mkdir(rank_dir)  # not makedirs: if tmp_dir was replaced meanwhile this must fail
        files = {
            f"{rank_dir.name}/{file_name}": digest.as_json()
            for file_name, digest in checkpoint_io.write_state_files(rank_dir, per_rank).items()
        }
        marker = {"save_id": save_id, "rank": self.rank, "files": files}
        checkpoint_io.write_json_file(rank_dir / DONE_NAME, marker, atomically=True)
        checkpoint_io.fsync_dir(rank_dir)

    def _await_rank_markers(self, tmp_dir: Path, save_id: str) -> dict[str, FileDigest]:
        """Poll for every rank's DONE carrying this save's id; return the files they list."""
        pending = set(range(self.world_size))
        files: dict[str, FileDigest] = {}
        poller = Poller(self.finalize_timeout_s)
        while True:
            for rank in sorted(pending):
                marker_name = f"{checkpoint_io.rank_dir_name(rank)}/{DONE_NAME}"
                marker = checkpoint_io.read_done_marker(tmp_dir / marker_name, save_id)
                if marker is not None:
                    listed, marker_digest = marker
                    files.update(listed)
                    files[marker_name] = marker_digest
                    pending.discard(rank)
            if not pending:
                return files
            if poller.expired():
                raise CheckpointError(
                    f"{tmp_dir}: ranks {sorted(pending)} did not finish writing within "
                    f"{self.finalize_timeout_s:g} s (finalize_timeout_s); did every rank call save()?"
                )
            poller.sleep()

    def _publish(self, tmp_dir: Path, final_dir: Path) -> None:
        """Rename into place; an older dir of the same step is only removed once the new one is in."""
        replaced = None
        if final_dir.exists():
            replaced = final_dir.with_name(f".trash-{final_dir.name}-{uuid.uuid4().hex[:12]}")
            os.rename(final_dir, replaced)
        os.rename(tmp_dir, final_dir)
        checkpoint_io.fsync_dir(self.root)
        if replaced is not None:
            logger.info("replaced earlier %s", final_dir)
            shutil.rmtree(replaced, ignore_errors=True)

    def _prune(self, saved_step: int) -> None:
        saved_name = checkpoint_io.step_dir_name(saved_step)
        complete = self.list()
        newer = [path.name for path in complete if path.name > saved_name]
        if newer:
            logger.warning(
                "checkpoints newer than %s exist in %s (%s), left by an earlier timeline; "
                "latest() will prefer them", saved_name, self.root, ", ".join(newer),
            )
        if self.keep is not None:
            for old in [path for path in complete if path.name != saved_name][self.keep - 1:]:
                logger.info("pruning %s (keep=%d)", old, self.keep)
                checkpoint_io.remove_dir(old)
        for entry in self.root.iterdir():
            tmp_match = _TMP_DIR_PATTERN.fullmatch(entry.name)
            if tmp_match and int(tmp_match.group(1)) < saved_step:
                logger.info("removing abandoned %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(_SCRATCH_PREFIXES):
                shutil.rmtree(entry, ignore_errors=True)

    def _write_as_follower(self, job: _SaveJob) -> None:
        tmp_dir = self.root / f".tmp-{checkpoint_io.step_dir_name(job.step)}"
        final_dir = self.root / checkpoint_io.step_dir_name(job.step)
        poller = Poller(self.finalize_timeout_s)
        while True:
            save_id = self._await_save_id(tmp_dir, poller)
            try:
                self._write_rank_part(tmp_dir, save_id, job.per_rank)
            except FileNotFoundError:
                continue  # rank 0 replaced the tmp dir under us (we had a crashed run's id)
            if self._await_publication(tmp_dir, final_dir, save_id, poller):
                return
            logger.info("rank %d: %s was reopened by rank 0; rewriting this rank's part", self.rank, tmp_dir)

    def _await_save_id(self, tmp_dir: Path, poller: Poller) -> str:
        while True:
            save_id = checkpoint_io.read_save_id(tmp_dir)
            if save_id is not None:
                return save_id
            if poller.expired():
                raise CheckpointError(
                    f"{tmp_dir}: rank {self.rank} waited {self.finalize_timeout_s:g} s for rank 0 to "
                    "open this save; did rank 0 call save() for the same step?"
                )
            poller.sleep()

    def _await_publication(self, tmp_dir: Path, final_dir: Path, save_id: str, poller: Poller) -> bool:
        """True once final_dir is published with our save id; False if our part must be rewritten."""
        while True:
            if checkpoint_io.read_published_save_id(final_dir) == save_id:
                return True
            current = checkpoint_io.read_save_id(tmp_dir)
            if current is not None and current != save_id:
                return False
            if poller.expired():
                raise CheckpointError(
                    f"{final_dir}: rank {self.rank} waited {self.finalize_timeout_s:g} s for rank 0 "
                    "to finalize this checkpoint"
                )
            poller.sleep()
