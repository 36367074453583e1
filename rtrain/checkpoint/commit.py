"""The multi-rank commit protocol: every rank of a job writes its part of one checkpoint, and the
checkpoint appears under its final name only once complete, without collectives.

Protocol (works on a shared filesystem and inside a background thread, hence no collectives):
rank 0 clears any leftover `.tmp-step-N` of a crashed run and opens a fresh one holding a random
SAVE_ID; every rank reads that id, writes + fsyncs its files in `rank-r/` and then a DONE marker
carrying the id; rank 0 waits for world_size markers with *its* id (so markers left by a crashed run
never count), writes meta.json and MANIFEST.json, fsyncs, renames the dir to `step-N` and fsyncs the
root (the manager prunes to the newest `keep` only after that). A rank that finds the SAVE_ID
replaced under it (it read a crashed run's id before rank 0 arrived) rewrites its part; other ranks
return only once `step-N` holds a manifest with their id, so a load right after save sees it on
every rank.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rtrain._io import fsync_dir
from rtrain.checkpoint import damage, files
from rtrain.checkpoint.files import (
    DONE_NAME,
    MANIFEST_NAME,
    META_NAME,
    SAVE_ID_NAME,
    SHARED_DIR,
    CheckpointError,
    FileDigest,
)

logger = logging.getLogger("rtrain.checkpoint")  # one logger for the package, as before the split

_FIRST_POLL_S = 0.005
_MAX_POLL_S = 0.25


@dataclass
class SaveJob:
    """Snapshots for one save, ready to write (shared and meta are empty except on rank 0)."""

    step: int
    shared: dict[str, Any]
    per_rank: dict[str, Any]
    meta: dict[str, Any]
    save_id: str = ""  # object stores (rtrain.checkpoint.remote): the same on every rank without asking


class Poller:
    """Backing-off sleeps until a deadline; many ranks polling one shared filesystem must stay light."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self._interval = _FIRST_POLL_S

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def sleep(self) -> None:
        time.sleep(self._interval)
        self._interval = min(_MAX_POLL_S, self._interval * 1.5)


def read_save_id(tmp_dir: Path) -> str | None:
    try:
        return (tmp_dir / SAVE_ID_NAME).read_text().strip() or None
    except OSError:
        return None


def read_published_save_id(final_dir: Path) -> str | None:
    try:
        return files.read_json_file(final_dir / MANIFEST_NAME).get("save_id")
    except (OSError, ValueError, AttributeError):
        return None


def read_done_marker(marker: Path, save_id: str) -> tuple[dict[str, FileDigest], FileDigest] | None:
    """The files a rank's DONE lists plus the marker's own digest; None while absent or from another save."""
    try:
        data = marker.read_bytes()
        done = json.loads(data.decode())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("save_id") != save_id:
        return None
    listed = {name: FileDigest(entry["sha256"], entry["size"]) for name, entry in done["files"].items()}
    return listed, FileDigest.of_bytes(data)


def publish_dir(root: Path, tmp_dir: Path, final_dir: Path) -> None:
    """Rename into place; an older dir of the same step is only removed once the new one is in, and only if
    it verifies: a damaged one is moved to damaged/ (rtrain.checkpoint.damage), never saved over."""
    replaced = None
    if final_dir.exists() and (why := damage.damage_of(final_dir)) is not None:
        damage.move_aside(root, final_dir, why)
    if final_dir.exists():
        replaced = final_dir.with_name(f"{files.TRASH_PREFIX}{final_dir.name}-{uuid.uuid4().hex[:12]}")
        os.rename(final_dir, replaced)
    os.rename(tmp_dir, final_dir)
    fsync_dir(root)
    if replaced is not None:
        logger.info("replaced earlier %s", final_dir)
        shutil.rmtree(replaced, ignore_errors=True)


class RankCommit:
    """This rank's side of the protocol: `commit(job)` returns once the step is published (on every
    rank), and on rank 0 returns the published directory.

    `publish(tmp_dir, final_dir)` does rank 0's final rename (by default publish_dir under `root`);
    CheckpointManager passes its own method, so that a test can hold publication back.
    """

    def __init__(self, root: Path, rank: int, world_size: int, timeout_s: float,
                 publish: Callable[[Path, Path], None] | None = None) -> None:
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._publish = publish or functools.partial(publish_dir, root)

    def commit(self, job: SaveJob) -> Path | None:
        if self.rank == 0:
            return self._lead(job)
        self._follow(job)
        return None

    # ------------------------------------------------------------------------------------------
    # rank 0

    def _lead(self, job: SaveJob) -> Path:
        tmp_dir = self.root / files.tmp_dir_name(job.step)
        save_id = uuid.uuid4().hex
        self._open_tmp_dir(tmp_dir, save_id)
        written: dict[str, FileDigest] = {}
        shared_dir = tmp_dir / SHARED_DIR
        shared_dir.mkdir()
        for file_name, digest in files.write_state_files(shared_dir, job.shared).items():
            written[f"{SHARED_DIR}/{file_name}"] = digest
        self._write_rank_part(tmp_dir, save_id, job.per_rank)
        written.update(self._await_rank_markers(tmp_dir, save_id))
        written[META_NAME] = files.write_json_file(tmp_dir / META_NAME, job.meta)
        manifest = files.build_manifest(job.step, self.world_size, save_id, written)
        files.write_json_file(tmp_dir / MANIFEST_NAME, manifest)
        fsync_dir(tmp_dir)
        final_dir = self.root / files.step_dir_name(job.step)
        self._publish(tmp_dir, final_dir)
        logger.info("saved checkpoint %s (%d files, %d bytes)", final_dir, len(written),
                    sum(digest.size for digest in written.values()))
        return final_dir

    def _open_tmp_dir(self, tmp_dir: Path, save_id: str) -> None:
        """Replace any leftover tmp dir by a fresh one that appears atomically with its SAVE_ID."""
        if tmp_dir.exists():
            logger.info("removing leftover %s of an interrupted save", tmp_dir)
            files.remove_dir(tmp_dir)
        staging = self.root / f"{files.STAGING_PREFIX}{save_id}"
        staging.mkdir()
        files.write_bytes_file(staging / SAVE_ID_NAME, save_id.encode())
        fsync_dir(staging)
        try:
            os.rename(staging, tmp_dir)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"{tmp_dir}: cannot open for writing ({error}); is another job saving into {self.root}?"
            ) from error

    def _await_rank_markers(self, tmp_dir: Path, save_id: str) -> dict[str, FileDigest]:
        """Poll for every rank's DONE carrying this save's id; return the files they list."""
        pending = set(range(self.world_size))
        listed_files: dict[str, FileDigest] = {}
        poller = Poller(self.timeout_s)
        while True:
            for rank in sorted(pending):
                marker_name = f"{files.rank_dir_name(rank)}/{DONE_NAME}"
                marker = read_done_marker(tmp_dir / marker_name, save_id)
                if marker is not None:
                    listed, marker_digest = marker
                    listed_files.update(listed)
                    listed_files[marker_name] = marker_digest
                    pending.discard(rank)
            if not pending:
                return listed_files
            if poller.expired():
                raise CheckpointError(
                    f"{tmp_dir}: ranks {sorted(pending)} did not finish writing within "
                    f"{self.timeout_s:g} s (finalize_timeout_s); did every rank call save()?"
                )
            poller.sleep()

    # ------------------------------------------------------------------------------------------
    # every rank

    def _write_rank_part(self, tmp_dir: Path, save_id: str, per_rank: dict[str, Any]) -> None:
        rank_dir = tmp_dir / files.rank_dir_name(self.rank)
        if rank_dir.exists():  # our own part from an attempt under a SAVE_ID that has since changed
            shutil.rmtree(rank_dir)
        os.mkdir(rank_dir)  # not makedirs: if tmp_dir was replaced meanwhile this must fail
        listed = {
            f"{rank_dir.name}/{file_name}": digest.as_json()
            for file_name, digest in files.write_state_files(rank_dir, per_rank).items()
        }
        marker = {"save_id": save_id, "rank": self.rank, "files": listed}
        files.write_json_file(rank_dir / DONE_NAME, marker, atomically=True)
        fsync_dir(rank_dir)

    # ------------------------------------------------------------------------------------------
    # ranks other than 0

    def _follow(self, job: SaveJob) -> None:
        tmp_dir = self.root / files.tmp_dir_name(job.step)
        final_dir = self.root / files.step_dir_name(job.step)
        poller = Poller(self.timeout_s)
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
            save_id = read_save_id(tmp_dir)
            if save_id is not None:
                return save_id
            if poller.expired():
                raise CheckpointError(
                    f"{tmp_dir}: rank {self.rank} waited {self.timeout_s:g} s for rank 0 to "
                    "open this save; did rank 0 call save() for the same step?"
                )
            poller.sleep()

    def _await_publication(self, tmp_dir: Path, final_dir: Path, save_id: str, poller: Poller) -> bool:
        """True once final_dir is published with our save id; False if our part must be rewritten."""
        while True:
            if read_published_save_id(final_dir) == save_id:
                return True
            current = read_save_id(tmp_dir)
            if current is not None and current != save_id:
                return False
            if poller.expired():
                raise CheckpointError(
                    f"{final_dir}: rank {self.rank} waited {self.timeout_s:g} s for rank 0 "
                    "to finalize this checkpoint"
                )
            poller.sleep()
