"""The Stateful contract, and how the named parts of a training process map onto a checkpoint.

Everything that must survive a restart has ``state_dict()`` (a dict carrying a ``version``) and
``load_state_dict(state)``. A checkpoint holds states by name, either once for the job (``shared``, written
by rank 0) or once per rank (``per_rank``: RNG streams, loader position, ZeRO partitions). Saving and
restoring are the same loop over the same named parts, so a part cannot be saved and then forgotten on resume.

A backend's state spans both scopes (model and optimizer once; ZeRO partitions per rank), so a *split* part
contributes each of its entries as a state of its own (one file each, written in parallel) plus a small
header naming them and carrying the part's version. Checkpoints of the first layout (written before this
contract) have no header: their backend entries sat beside the others and are read as version 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rtrain._errors import ExpectedError

Scope = Literal["shared", "per_rank", "split"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateError(ExpectedError, ValueError):
    """A checkpoint lacks a state this run needs, or holds one of an unknown version."""


@dataclass(frozen=True)
class Part:
    name: str
    obj: Stateful
    scope: Scope
    optional: bool = False  # a checkpoint without it still restores (the part keeps its fresh state)


def collect(parts: list[Part]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shared, per_rank) states of every part, ready for a checkpoint."""
    shared: dict[str, Any] = {}
    per_rank: dict[str, Any] = {}
    for part in parts:
        state = part.obj.state_dict()
        if part.scope == "shared":
            shared[part.name] = state
        elif part.scope == "per_rank":
            per_rank[part.name] = state
        else:
            shared.update(state["shared"])
            per_rank.update(state["per_rank"])
            shared[part.name] = {"version": state["version"], "shared": sorted(state["shared"]),
                                 "per_rank": sorted(state["per_rank"])}
    return shared, per_rank


def restore(parts: list[Part], shared: dict[str, Any], per_rank: dict[str, Any],
            skip: tuple[str, ...] = ()) -> None:
    """Load every part (but those named in `skip`) from a checkpoint's states (the inverse of collect)."""
    claimed = {part.name for part in parts if part.scope != "split"}
    for part in parts:
        if part.name in skip:
            continue
        if part.scope == "split":
            part.obj.load_state_dict(_split_state(part.name, shared, per_rank, claimed))
            continue
        states = shared if part.scope == "shared" else per_rank
        if part.name not in states:
            if part.optional:
                continue
            raise StateError(f"the checkpoint has no {part.scope} state {part.name!r} "
                             f"(it holds {sorted(states)})")
        part.obj.load_state_dict(states[part.name])


def _split_state(name: str, shared: dict[str, Any], per_rank: dict[str, Any], claimed: set[str]) -> dict:
    header = shared.get(name)
    if header is None:  # the first layout: every unclaimed entry belongs to the backend
        return {"version": 0,
                "shared": {k: v for k, v in shared.items() if k not in claimed},
                "per_rank": {k: v for k, v in per_rank.items() if k not in claimed}}
    missing = [k for k in header["shared"] if k not in shared]
    if missing:
        raise StateError(f"the checkpoint lacks {missing} of the {name} state")
    return {"version": header["version"],
            "shared": {k: shared[k] for k in header["shared"]},
            "per_rank": {k: per_rank[k] for k in header["per_rank"] if k in per_rank}}
