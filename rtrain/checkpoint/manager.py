"""CheckpointManager: atomic, verified, keep-k checkpoints written by every rank of a job without collectives.

Layout under `root`:
    step-{N:09d}/shared/<name>.pt      written once, by rank 0
    step-{N:09d}/rank-{r:05d}/<name>.pt  written by rank r (RNG streams, loader position, ZeRO shards)
    step-{N:09d}/rank-{r:05d}/DONE     rank r's list of its files with sha256 + size
    step-{N:09d}/meta.json             small JSON (resolved recipe, MLflow run id, epoch, ...)
    step-{N:09d}/MANIFEST.json         sha256 + size of every file, world_size, step, format version

How the ranks agree on a complete step dir is rtrain.checkpoint.commit; the file formats and their
verification are rtrain.checkpoint.files. Here: argument checks, snapshots (in the caller's thread,
optionally written by a background thread), pruning, listing and loading.

Every rank must call save() for every checkpointed step; `shared` and `meta` are only read on rank 0.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtrain.checkpoint import commit, damage, files, snapshot
from rtrain.checkpoint.commit import RankCommit, SaveJob
from rtrain.checkpoint.files import SHARED_DIR, STATE_SUFFIX, CheckpointError

logger = logging.getLogger("rtrain.checkpoint")  # one logger for the package, as before the split


@dataclass
class Loaded:
    step: int
    path: Path
    shared: dict[str, Any]
    per_rank: dict[str, Any]  # this rank's states only
    meta: dict[str, Any]
    world_size: int = 1  # the world size the checkpoint was written with
    save_id: str = ""  # which save of its step (the ranks of a resume check that they loaded the same one)


def _check_arguments(keep: Any, rank: Any, world_size: Any, finalize_timeout_s: Any) -> None:
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ValueError(f"CheckpointManager keep must be an int >= 1 or None (keep all), got {keep!r}")
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"CheckpointManager world_size must be an int >= 1, got {world_size!r}")
    if type(rank) is not int or not 0 <= rank < world_size:
        raise ValueError(f"CheckpointManager rank must be in [0, {world_size}), got {rank!r}")
    if not finalize_timeout_s > 0:
        raise ValueError(f"CheckpointManager finalize_timeout_s must be > 0, got {finalize_timeout_s!r}")


_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EIO: "input/output error",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
LOW_SPACE_BYTES = 64 << 20


def storage_failure(root: Path, error: BaseException) -> str | None:
    """What a failed write says about the storage under `root`, in words (None: not a storage failure). torch's
    writer reports a full disk as `[enforce fail at inline_container.cc] . unexpected pos`, without an errno:
    then the free space decides."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return f"{_STORAGE_ERRNOS[error.errno]} ({errno.errorcode[error.errno]})"
    text = str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = None
        if free is not None and free < LOW_SPACE_BYTES:
            return f"no space left on device ({free >> 20} MiB free; torch's writer failed)"
        return f"the write failed ({text.splitlines()[0][:200]})"
    return None


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
        _check_arguments(keep, rank, world_size, finalize_timeout_s)
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.async_save = async_save
        self.finalize_timeout_s = float(finalize_timeout_s)
        self.last_save_blocking_s = 0.0  # how long the latest save() held up its caller
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rtrain-ckpt") if async_save else None
        self._snapshot_buffers = snapshot.SnapshotBuffers() if async_save else None
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._open_root()

    def _open_root(self) -> None:
        """The root's commit protocol (rtrain.checkpoint.remote: another one for object stores)."""
        self._commit = RankCommit(self.root, self.rank, self.world_size, self.finalize_timeout_s,
                                  publish=self._publish)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any] | None = None,
             meta: dict | None = None) -> None:
        started = time.perf_counter()
        self._finish_pending()
        job = self._prepare(step, shared, per_rank, meta)
        if self._executor is None:
            self._write(job)
        else:
            self._pending = self._executor.submit(self._write, job)
            self._pending_step = step
        self.last_save_blocking_s = time.perf_counter() - started

    def wait(self) -> None:
        """Until the newest save is complete; raises if it failed."""
        self._finish_pending()

    def _finish_pending(self) -> None:
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
                f"{self.root / files.step_dir_name(step)}: background save failed: {error}"
            ) from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._snapshot_buffers = snapshot.SnapshotBuffers()  # release the host copies

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
            match = files.STEP_DIR_PATTERN.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return [path for _, path in sorted(found, reverse=True)]

    def latest(self, shared_only: bool = False) -> Loaded | None:
        """Newest checkpoint that verifies, falling back to older ones past damaged ones (read only)."""
        return self._scan(shared_only)[0]

    def resume(self, on_all_damaged: str = "refuse") -> Loaded | None:
        """latest() for a run about to train into this root (rtrain.checkpoint.damage): damaged checkpoints
        newer than the one resumed from are moved to `damaged/` (by rank 0) so that nothing is saved over
        them; when checkpoints exist but none verifies, raise CheckpointsDamaged (`refuse`, touching nothing)
        or move them all aside and return None (`restart`: train from step 0)."""
        damage.check_policy(on_all_damaged)
        loaded, damaged = self._scan(shared_only=False)
        if damaged and loaded is None and on_all_damaged == "refuse":
            raise damage.refusal(self.root, damaged)
        if self.rank == 0:
            for found in damaged:
                self._set_aside(found.path, found.reason)
        return loaded

    def _set_aside(self, path: Path, reason: str) -> None:
        damage.move_aside(self.root, path, reason)

    def _scan(self, shared_only: bool) -> tuple[Loaded | None, list[damage.Damaged]]:
        """The newest checkpoint that verifies and the newer ones that did not (newest first)."""
        damaged: list[damage.Damaged] = []
        for path in self.list():
            try:
                loaded = self.load(path, shared_only=shared_only)
            except CheckpointError as error:
                logger.warning("skipping damaged checkpoint %s", error)  # the message names dir and file
                damaged.append(damage.Damaged(path, str(error)))
                continue
            skipped = ", ".join(found.path.name for found in damaged)
            because = f" (newer ones failed verification: {skipped})" if damaged else ""
            logger.info("using checkpoint %s, step %d%s", path, loaded.step, because)
            return loaded, damaged
        if damaged:
            logger.warning("no usable checkpoint in %s: all of %s failed verification", self.root,
                           [found.path.name for found in damaged])
        else:
            logger.info("no checkpoint in %s", self.root)
        return None, damaged

    def load(self, path: str | os.PathLike, shared_only: bool = False) -> Loaded:
        """Verify every file against the manifest, then load shared states and this rank's own (none with
        `shared_only`: a reader of the weights, e.g. `rtrain eval`, on any world size)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        manifest = files.read_manifest(path)
        files.check_step_name(path, manifest)
        files.verify_files(path, manifest)
        loaded = loaded_from(path, manifest, self.rank, shared_only)
        if manifest["world_size"] != self.world_size and not shared_only:
            logger.warning(
                "%s was written by %d ranks, this job has %d: rank %d gets %s per-rank states",
                path, manifest["world_size"], self.world_size, self.rank, "its" if loaded.per_rank else "no",
            )
        return loaded

    def per_rank_states_of(self, loaded: Loaded, rank: int) -> dict[str, Any]:
        """Another rank's per-rank states of a loaded checkpoint (verified again), for a job on another world
        size: a rank the checkpoint has no states for continues from a peer's loader position."""
        if not 0 <= rank < loaded.world_size:
            raise CheckpointError(f"{loaded.path}: written by {loaded.world_size} ranks, has no rank {rank}")
        manifest = files.read_manifest(loaded.path)
        folder = files.rank_dir_name(rank)
        names = [name for name in manifest["files"] if name.rpartition("/")[0] == folder]
        files.verify_files(loaded.path, {**manifest, "files": {n: manifest["files"][n] for n in names}})
        return {name.rpartition("/")[2][: -len(STATE_SUFFIX)]: files.load_torch_file(loaded.path, name)
                for name in names if name.endswith(STATE_SUFFIX)}

    def _prepare(self, step: int, shared: Any, per_rank: Any, meta: Any) -> SaveJob:
        """Runs in the caller's thread."""
        if type(step) is not int or step < 0:
            raise CheckpointError(f"checkpoint step must be an int >= 0, got {step!r}")
        buffers = self._snapshot_buffers  # async: the caller may mutate its tensors once save() returns
        shared_states: dict[str, Any] = {}
        meta_state: dict[str, Any] = {}
        if self.rank == 0:
            shared_states = _snapshot_group("shared", shared, buffers)
            if meta is not None and type(meta) is not dict:
                raise CheckpointError(f"meta must be a dict, got {type(meta).__qualname__}")
            snapshot.check_json_state(meta or {}, "meta")
            meta_state = json.loads(json.dumps(meta or {}))  # a private copy, written later
        per_rank_states = _snapshot_group("per_rank", per_rank or {}, buffers)
        if buffers is not None:
            buffers.finish()
        return SaveJob(step, shared_states, per_rank_states, meta_state)

    def _write(self, job: SaveJob) -> None:
        """Runs in the caller's thread or the background thread."""
        try:
            published = self._commit.commit(job)
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as error:
            cause = storage_failure(self.root, error)
            if cause is None:
                raise
            saved = self.list()
            newest = f"the newest verified checkpoint is {saved[0]}" if saved else "no checkpoint was saved yet"
            raise CheckpointError(
                f"{self.root / files.step_dir_name(job.step)}: cannot write the checkpoint: {cause}; {newest}: "
                "free space (or fix the storage) and rerun the same command to resume") from None
        if published is not None:  # rank 0, once the step is published
            self._prune(job.step)

    def _publish(self, tmp_dir: Path, final_dir: Path) -> None:
        """Rank 0's final rename (commit.publish_dir); a method so that a test can hold it back."""
        commit.publish_dir(self.root, tmp_dir, final_dir)

    def _prune(self, saved_step: int) -> None:
        saved_name = files.step_dir_name(saved_step)
        complete = self.list()
        newer = [path.name for path in complete if path.name > saved_name]
        if newer:
            logger.warning(
                "checkpoints newer than %s exist in %s (%s), left by an earlier timeline; "
                "latest() will prefer them", saved_name, self.root, ", ".join(newer),
            )
        if self.keep is not None:
            # Only this timeline's older checkpoints count towards `keep`: newer ones (unknown, possibly
            # damaged) are neither kept in their place nor deleted; a save of their step replaces them
            # (commit.publish_dir moves a damaged one aside), and damaged ones found at resume are gone
            # to damaged/ already. An older one failing the cheap checks (manifest, sizes) is moved aside,
            # not counted. The just-published one, verified as written, always stays.
            older = []
            for path in (p for p in complete if p.name < saved_name):
                why = damage.damage_of(path, read_bytes=False)
                if why is None:
                    older.append(path)
                else:
                    damage.move_aside(self.root, path, why)
            for old in older[self.keep - 1:]:
                logger.info("pruning %s (keep=%d)", old, self.keep)
                files.remove_dir(old)
        for entry in self.root.iterdir():
            tmp_match = files.TMP_DIR_PATTERN.fullmatch(entry.name)
            if tmp_match and int(tmp_match.group(1)) < saved_step:
                logger.info("removing abandoned %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(files.SCRATCH_PREFIXES):
                shutil.rmtree(entry, ignore_errors=True)


def _snapshot_group(group: str, states: Any, buffers: snapshot.SnapshotBuffers | None) -> dict[str, Any]:
    if not isinstance(states, dict):
        raise CheckpointError(f"{group} must be a dict of name -> state, got {type(states).__qualname__}")
    snapshots = {}
    for name, state in states.items():
        files.check_state_name(name, group)
        snapshots[name] = snapshot.snapshot_state(state, f"{group}[{name!r}]", buffers)
    return snapshots


def loaded_from(path: Path, manifest: dict, rank: int, shared_only: bool) -> Loaded:
    """The shared states and `rank`'s own (none with `shared_only`) of a verified checkpoint folder."""
    wanted = (SHARED_DIR,) if shared_only else (SHARED_DIR, files.rank_dir_name(rank))
    shared: dict[str, Any] = {}
    per_rank: dict[str, Any] = {}
    for name in manifest["files"]:
        folder, _, file_name = name.rpartition("/")
        if file_name.endswith(STATE_SUFFIX) and folder in wanted:
            states = shared if folder == SHARED_DIR else per_rank
            states[file_name[: -len(STATE_SUFFIX)]] = files.load_torch_file(path, name)
    return Loaded(manifest["step"], path, shared, per_rank, files.read_meta(path, manifest), manifest["world_size"],
                  str(manifest.get("save_id") or ""))
