"""`lmforge cache prune`: cleaning the shared stage store (components/shared_cache.py) without ever leaving an
entry half there and complete-looking. Manifests go first, then the blobs no remaining manifest names, leftover
`.part-*` uploads and dead leases; an entry whose lease is live stays.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field

from components.shared_cache import SharedStageStore

log = logging.getLogger(__name__)

# A `.part-*` upload or a blob no manifest names, written this recently, may belong to a publish in progress.
PRUNE_GRACE_S = 3600.0


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """The seconds of `90s`, `30m`, `12h`, `30d` or `2w`; a ValueError that shows those forms otherwise."""
    match = _DURATION.fullmatch(text or "")
    if match is None:
        raise ValueError(f"cannot read {text!r} as a duration: write a number and one unit of s, m, h, d, w "
                         "(90s, 30m, 12h, 30d, 2w)")
    return float(match[1]) * _UNIT_S[match[2].lower()]


@dataclass
class StoredEntry:
    """A stage's manifest in the store. `files`: the sha256 and bytes of each blob it names (None: unreadable)."""

    stage: str
    key: str
    path: str
    modified: float
    manifest_bytes: int
    files: dict[str, int] | None

    @property
    def bytes(self) -> int:
        return self.manifest_bytes + sum((self.files or {}).values())


@dataclass
class PrunePlan:
    """What a prune removes (a dry run: would remove), each path with its bytes, and what it leaves and why."""

    entries: list[tuple[StoredEntry, str]] = field(default_factory=list)  # with the rule that lets each go
    protected: list[StoredEntry] = field(default_factory=list)  # a worker holds their lease: kept
    blobs: dict[str, int] = field(default_factory=dict)  # named by no manifest that stays
    partials: dict[str, int] = field(default_factory=dict)  # `.part-*` uploads older than PRUNE_GRACE_S
    leases: dict[str, int] = field(default_factory=dict)  # records of released or expired leases

    @property
    def freed_bytes(self) -> int:
        paths = (self.blobs, self.partials, self.leases)
        return sum(e.manifest_bytes for e, _ in self.entries) + sum(sum(p.values()) for p in paths)


def _listing(store: SharedStageStore, top: str) -> dict[str, int]:
    """Path -> bytes of every file under `top` in the store."""
    path = store._path(top)
    store.fs.invalidate_cache(path)
    try:
        found = store.fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {p: int(info.get("size") or 0) for p, info in found.items() if info.get("type", "file") == "file"}


def _parts(store: SharedStageStore, path: str) -> list[str]:
    return path[len(store.root) + 1:].split("/")


def _age_s(store: SharedStageStore, path: str, now: float) -> float:
    return now - store.fs.modified(path).timestamp()


def _stored_entry(store: SharedStageStore, path: str, size: int) -> StoredEntry | None:
    """The entry of a manifest path (None: not a manifest's name, or removed meanwhile)."""
    parts = _parts(store, path)
    if len(parts) != 3 or not parts[2].endswith(".json"):
        return None
    try:
        modified, raw = store.fs.modified(path).timestamp(), store.fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        files = {m["sha256"]: int(m["bytes"]) for m in json.loads(raw)["files"].values()}
    except (ValueError, KeyError, TypeError, AttributeError):
        files = None
    return StoredEntry(parts[1], parts[2].removesuffix(".json"), path, modified, size, files)


def stored_entries(store: SharedStageStore) -> list[StoredEntry]:
    """Every manifest in the store, newest first (published last)."""
    found = (_stored_entry(store, p, size) for p, size in _listing(store, "stages").items() if ".part-" not in p)
    return sorted((e for e in found if e is not None), key=lambda e: e.modified, reverse=True)


def _doomed(entries: list[StoredEntry], older_than_s: float | None, keep: int | None,
            now: float) -> list[tuple[StoredEntry, str]]:
    """The entries every rule given lets go (older than `older_than_s`; not among the `keep` newest of their
    stage), each with why; an unreadable manifest always goes (readers refuse it)."""
    doomed, rank = [], {}
    for entry in entries:  # newest first
        if entry.files is None:
            doomed.append((entry, "unreadable manifest"))
            continue
        rank[entry.stage] = rank.get(entry.stage, -1) + 1
        why = []
        if older_than_s is not None:
            if now - entry.modified <= older_than_s:
                continue
            why.append("older than --older-than")
        if keep is not None:
            if rank[entry.stage] < keep:
                continue
            why.append(f"beyond the newest {keep}")
        if why:
            doomed.append((entry, ", ".join(why)))
    return doomed


def _lease_files(store: SharedStageStore) -> dict[tuple[str, str], dict[str, int]]:
    """(stage, key) -> its lease records' paths and bytes."""
    groups: dict[tuple[str, str], dict[str, int]] = {}
    for path, size in _listing(store, "leases").items():
        parts = _parts(store, path)
        if len(parts) == 4:
            groups.setdefault((parts[1], parts[2]), {})[path] = size
    return groups


def plan_prune(store: SharedStageStore, *, older_than_s: float | None = None, keep: int | None = None,
               now: float | None = None) -> PrunePlan:
    """What `prune` would remove: the entries the rules let go (`_doomed`) unless a worker holds their lease,
    the blobs only they name, blobs no manifest names and `.part-*` uploads left over by a publisher that died
    (written more than PRUNE_GRACE_S ago: a newer one may be a publish in progress), and the records of leases
    released or expired that long ago. Reads listings and manifests only."""
    now = time.time() if now is None else now
    plan, held = PrunePlan(), set()
    for (stage, key), files in _lease_files(store).items():
        if store.live_lease(stage, key) is not None:
            held.add((stage, key))
        elif all(_age_s(store, p, now) > PRUNE_GRACE_S for p in files):
            plan.leases.update(files)
    entries = stored_entries(store)
    for entry, why in _doomed(entries, older_than_s, keep, now):
        if (entry.stage, entry.key) in held:
            plan.protected.append(entry)
        else:
            plan.entries.append((entry, why))
    going = {e.path for e, _ in plan.entries}
    named = {sha for e in entries if e.path not in going for sha in e.files or {}}
    freed = {sha for e, _ in plan.entries for sha in e.files or {}}
    stale_parts = {p: size for p, size in _listing(store, "stages").items() if ".part-" in p}
    for path, size in _listing(store, "blobs").items():
        sha = path.rsplit("/", 1)[-1]
        if ".part-" in path:
            stale_parts[path] = size
        elif sha not in named and (sha in freed or _age_s(store, path, now) > PRUNE_GRACE_S):
            plan.blobs[path] = size
    plan.partials = {p: size for p, size in stale_parts.items() if _age_s(store, p, now) > PRUNE_GRACE_S}
    return plan


def _remove(store: SharedStageStore, path: str) -> bool:
    try:
        store.fs.rm_file(path)
    except FileNotFoundError:  # removed by someone else meanwhile
        return False
    return True


def prune(store: SharedStageStore, plan: PrunePlan) -> PrunePlan:
    """Carry out `plan` (plan_prune) in the order that keeps readers safe, and return what was removed.

    Each entry's manifest, its complete marker, goes first: a reader that finds none computes the stage, and one
    that read it just before finds a file missing and refuses the copy (`fetch`). An entry whose lease a worker
    took since the plan stays. Blobs go next, except those a manifest names now (published since the plan);
    then leftover uploads, and dead leases unless taken since. Directories stay: a writer may be about to use
    one (an object store has none)."""
    done = PrunePlan()
    for entry, why in plan.entries:
        if store.live_lease(entry.stage, entry.key) is not None:
            done.protected.append(entry)
        elif _remove(store, entry.path):
            done.entries.append((entry, why))
    done.protected += plan.protected
    named = {sha for entry in stored_entries(store) for sha in entry.files or {}}
    done.blobs = {p: n for p, n in plan.blobs.items() if p.rsplit("/", 1)[-1] not in named and _remove(store, p)}
    done.partials = {p: n for p, n in plan.partials.items() if _remove(store, p)}
    dead = {}
    for path, size in plan.leases.items():
        parts = _parts(store, path)
        dead.setdefault((parts[1], parts[2]), {})[path] = size
    for (stage, key), files in dead.items():
        if store.live_lease(stage, key) is None:
            done.leases.update({p: n for p, n in files.items() if _remove(store, p)})
    log.info("pruned %s: %d entries, %d blobs, %d partial uploads, %d lease records, %.1f MB", store.url,
             len(done.entries), len(done.blobs), len(done.partials), len(done.leases), done.freed_bytes / 1e6)
    return done
