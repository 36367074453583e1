"""What a checkpoint step in an object store must look like (rtrain.checkpoint.remote): its manifest, a rank's
DONE and the store's listing, checked before anything is downloaded or published. Pure functions of bytes and
listings: nothing here talks to a store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rtrain._remote import ObjectPath
from rtrain.checkpoint import files
from rtrain.checkpoint.files import DONE_NAME, MANIFEST_NAME, CheckpointError, FileDigest


class StoreFailure(Exception):
    """The object store failed during a save (retried); `error` says how, in one line."""

    def __init__(self, error: CheckpointError) -> None:
        super().__init__(str(error))
        self.error = error


def parse_manifest(path: ObjectPath, data: bytes) -> dict[str, Any]:
    """A step's MANIFEST.json, checked as on disk, plus its save folder and its step against the step's name."""
    try:
        manifest = json.loads(data.decode())
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: unreadable {MANIFEST_NAME}: {str(error)[:200]}") from None
    problem = files.manifest_problem(manifest)
    if not problem and "folder" in manifest and not (  # absent: the first layout; present: a save's id
            isinstance(manifest["folder"], str) and files.SAVE_ID_PATTERN.fullmatch(manifest["folder"])):
        problem = "'folder' is not a save id"
    if problem:
        raise CheckpointError(f"{path}: bad {MANIFEST_NAME}: {problem}")
    if files.step_dir_name(manifest["step"]) != path.name:
        raise CheckpointError(f"{path}: {MANIFEST_NAME} says step {manifest['step']}, the folder disagrees")
    return manifest


def check_listed(path: ObjectPath, manifest: dict, listing: dict[str, int]) -> None:
    """Every file of the manifest is in the store's listing (names relative to the root) with its size."""
    folder = files_folder(path, manifest)
    for name, entry in manifest["files"].items():
        size = listing.get(f"{folder}/{name}")
        if size is None:
            raise CheckpointError(f"{path}: missing file {name}")
        if size != entry["size"]:
            raise CheckpointError(f"{path}: file {name} has {size} bytes, manifest says {entry['size']} "
                                  "(truncated?)")


def download_capped(fs: Any, key: str, target: Path, size: int, what: str) -> None:
    """One object to a local file, never more than `size` bytes (+1, to see that it grew): an object replaced
    or removed since it was listed is a step that changed, named (`what`: the step and file), not a raw
    error. The store's other failures and this node's (a full staging disk) pass as they are: not damage."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        source = fs.open(key, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{what} is gone from the store (the step changed while it was read)") from None
    left = size + 1
    with source, open(target, "wb") as out:
        while left > 0 and (block := source.read(min(left, 8 << 20))):
            out.write(block)
            left -= len(block)
    if left <= 0:
        raise CheckpointError(f"{what} is larger than the {size} bytes its manifest says (replaced since it "
                              "was listed?)")


def files_folder(path: ObjectPath, manifest: dict) -> str:
    """Where a step's files are, relative to the root: its save's folder (in the first remote layout, without
    one, the step's folder itself)."""
    return f"{path.name}/{manifest['folder']}" if manifest.get("folder") else path.name


def parse_marker(data: bytes, save_id: str, rank: int, world_size: int, where: str) -> dict[str, FileDigest] | None:
    """The files a rank's DONE lists; None for one that is not this save's (a killed attempt's, garbage), an
    error for one of this save that lists what rank `rank` does not write (never published)."""
    try:
        done = json.loads(data.decode())
    except (ValueError, RecursionError):
        return None
    if not isinstance(done, dict) or done.get("save_id") != save_id:
        return None
    listed = done.get("files")
    if not isinstance(listed, dict):
        raise CheckpointError(f"{where}: 'files' is not a JSON object")
    folder = files.rank_dir_name(rank) + "/"
    for name, entry in listed.items():
        problem = files.entry_problem(name, entry, world_size)
        if problem is None and (not name.startswith(folder) or name == folder + DONE_NAME):
            problem = f"file entry {name!r} is not one of rank {rank}'s files"
        if problem:
            raise CheckpointError(f"{where}: {problem}")
    return {name: FileDigest(entry["sha256"], entry["size"]) for name, entry in listed.items()}


def renamed(remote: ObjectPath, local: Path, call: Any) -> Any:
    """Run `call`; a CheckpointError it raises names the object-store location, not the local staging copy."""
    try:
        return call()
    except CheckpointError as error:
        raise CheckpointError(str(error).replace(str(local), str(remote))) from None
