"""A stage cache shared by machines: complete stage outputs in one store, found by stage key.

A worker whose workspace lacks a stage looks its key up here, downloads the files into a temp directory,
checks every sha256 against the manifest and only then renames the directory into its workspace. A worker
that computes a stage publishes it: its files first, its manifest last (the complete marker). Two workers that
need the same missing stage take a lease in the store; one computes while the other waits, then downloads.

The store is any fsspec URL: `file:///mnt/shared/lmforge` (an NFS or SMB mount), `s3://bucket/lmforge`,
`gs://bucket/lmforge`. Why fsspec and not the MLflow artifact store: a lease needs a write that fails when the
object exists (create-if-absent: O_EXCL on a mount, conditional writes on S3 and GCS), which MLflow's artifact
API does not offer, and MLflow artifacts belong to runs, so a lookup by key would need a search first. Every
output still reaches MLflow for people to browse (components/mlflow_outputs.py).

Layout under the URL:
    blobs/<sha256[:2]>/<sha256>             each output file once, named by its content (shared across keys)
    stages/<stage>/<key>.json               the manifest, written after its blobs
    leases/<stage>/<key>/<generation>.json  who computes the stage and until when; generations only grow, so a
                                            takeover is one more create-if-absent, never a delete racing a create

components/shared_cache_prune.py cleans it (`lmforge cache prune`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from components.artifacts import MANIFEST, atomic_dir, atomic_write_json, manifest_digest, sha256_file

log = logging.getLogger(__name__)

ENV_URL = "LMFORGE_SHARED_CACHE"


class RemoteCopyRefused(Exception):
    """A stage in the store whose manifest or files do not match their digests (a partial or corrupt copy)."""


def shared_url(configured: str | None) -> str | None:
    """The store URL in effect: LMFORGE_SHARED_CACHE when set (`off` turns the store off), else the config's."""
    env = os.environ.get(ENV_URL, "").strip()
    if env:
        return None if env.lower() in ("off", "none", "0", "false") else env
    return configured or None


def _relocate(value, old: str, new: str):
    """`value` with every string that is `old` or a path under it moved to `new`."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")):]
    return value


def open_store(configured_url: str | None, lease_ttl_s: float = 60.0) -> SharedStageStore | None:
    """The shared store in effect (shared_url: the environment over the config), or None: this workspace only."""
    url = shared_url(configured_url)
    return SharedStageStore(url, lease_ttl_s) if url else None


class SharedStageStore:
    """The stages of a store URL (module docstring). `lease_ttl_s`: how long a lease lasts without renewal;
    the holder renews it every third of that, so a holder that dies frees the stage within one TTL."""

    def __init__(self, url: str, lease_ttl_s: float = 60.0, poll_s: float | None = None):
        self.url, self.lease_ttl_s = url, float(lease_ttl_s)
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.2, self.lease_ttl_s / 6))
        import fsspec  # here: a run without a shared store does not pay for the import

        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _manifest_path(self, stage: str, key: str) -> str:
        return self._path("stages", stage, f"{key}.json")

    def _blob(self, sha256: str) -> str:
        return self._path("blobs", sha256[:2], sha256)

    def has(self, stage: str, key: str) -> bool:
        path = self._manifest_path(stage, key)
        self.fs.invalidate_cache(path)  # object-store backends cache listings; other machines write here
        return self.fs.exists(path)

    def entry_state(self, stage: str, key: str) -> str:
        """`complete` when the store holds the stage's manifest and every file it names at its size, `absent`
        without a manifest, else `incomplete` (a reader would refuse it). Reads the manifest, downloads no file."""
        return self.entry(stage, key)[0]

    def entry(self, stage: str, key: str) -> tuple[str, dict | None]:
        """(`entry_state`, the stored manifest when complete, else None)."""
        try:
            manifest = self._remote_manifest(stage, key)
        except RemoteCopyRefused:
            return "incomplete", None
        if manifest is None:
            return "absent", None
        for meta in manifest["files"].values():
            try:
                if self.fs.info(self._blob(meta["sha256"]))["size"] != meta["bytes"]:
                    return "incomplete", None
            except FileNotFoundError:
                return "incomplete", None
        return "complete", manifest

    def _put(self, data: bytes | Path, dest: str) -> None:
        """Write `dest` whole or not at all: upload beside it, then rename (one atomic rename on a mount; on
        an object store the object appears when its upload completes)."""
        part = f"{dest}.part-{uuid.uuid4().hex}"
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(data, Path):
            self.fs.put_file(str(data), part)
        else:
            self.fs.pipe_file(part, data)
        self.fs.mv(part, dest)

    def publish(self, manifest: dict) -> int:
        """Upload a complete stage: the files the store lacks (by content), then its manifest. Returns the
        bytes uploaded (0 when every file was there already)."""
        root, sent = Path(manifest["dir"]), 0
        for rel, meta in sorted(manifest["files"].items()):
            blob = self._blob(meta["sha256"])
            try:
                if self.fs.info(blob)["size"] == meta["bytes"]:
                    continue
            except FileNotFoundError:
                pass
            self._put(root / rel, blob)
            sent += meta["bytes"]
        self._put(json.dumps(manifest, indent=2, sort_keys=True).encode(), self._manifest_path(manifest["stage"], manifest["cache_key"]))
        log.info("%s: published %s to %s (%.1f MB uploaded)", manifest["stage"], manifest["cache_key"], self.url, sent / 1e6)
        return sent

    def try_publish(self, manifest: dict) -> bool:
        """`publish`, where a store that fails is a warning: the stage is complete in its workspace all the same."""
        try:
            self.publish(manifest)
        except Exception as exc:  # network, permissions, quota: the result stands; a later run publishes it
            log.warning("%s: could not publish %s to %s (%s: %s); it stays in this workspace only",
                        manifest["stage"], manifest["cache_key"], self.url, type(exc).__name__, exc)
            return False
        return True

    def _remote_manifest(self, stage: str, key: str) -> dict | None:
        self.fs.invalidate_cache(self._manifest_path(stage, key))
        try:
            raw = self.fs.cat_file(self._manifest_path(stage, key))
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
            consistent = (manifest["stage"] == stage and manifest["cache_key"] == key
                          and manifest_digest(manifest) == manifest["digest"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteCopyRefused(f"its manifest is unreadable ({type(exc).__name__}: {exc})") from None
        if not consistent:
            raise RemoteCopyRefused("its manifest's digest does not match its files, stage or key")
        return manifest

    def fetch(self, stage: str, key: str, out: Path) -> dict | None:
        """The stage downloaded into `out` with its manifest (now pointing at `out`), or None when the store
        does not hold it complete. A copy whose manifest or files fail their digests is refused (logged) and
        `out` is left as it was; a blob whose content is not what its name says is removed from the store, so
        the next publish uploads it again."""
        try:
            manifest = self._remote_manifest(stage, key)
            if manifest is None:
                return None
            with atomic_dir(out) as tmp:
                files = {rel: self._download(rel, meta, tmp) for rel, meta in manifest["files"].items()}
                here = str(Path(out).resolve())
                # Paths a stage recorded inside its own directory (prepare's model source) name this machine's copy.
                info = _relocate(manifest.get("info", {}), manifest["dir"], here)
                local = {**manifest, "dir": here, "files": files, "info": info}
                atomic_write_json(tmp / MANIFEST, local)
        except RemoteCopyRefused as exc:
            log.warning("%s: refusing the copy of %s in %s: %s; computing it here", stage, key, self.url, exc)
            return None
        log.info("%s: downloaded %s from %s", stage, key, self.url)
        return local

    def _download(self, rel: str, meta: dict, tmp: Path) -> dict:
        blob, dest = self._blob(meta["sha256"]), tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get_file(blob, str(dest))
        except FileNotFoundError:
            raise RemoteCopyRefused(f"{rel} is missing (blob {meta['sha256'][:12]}): a partial copy") from None
        if dest.stat().st_size != meta["bytes"] or sha256_file(dest) != meta["sha256"]:
            with contextlib.suppress(OSError):
                self.fs.rm_file(blob)
            raise RemoteCopyRefused(f"{rel} does not match its sha256 {meta['sha256'][:12]}: a corrupt copy")
        return {**meta, "mtime_ns": dest.stat().st_mtime_ns}

    @contextlib.contextmanager
    def claim(self, stage: str, key: str, out: Path, *, reuse: bool = True) -> Iterator[dict | None]:
        """Yields the stage's manifest, downloaded into `out`, when the store holds it complete or comes to
        hold it while this worker waits for the lease; else None, with the stage's lease held (and renewed in
        the background) until the block ends. `reuse=False` (a forced recompute) never downloads: it only
        waits for the lease."""
        announced = None
        while True:
            if reuse and (fetched := self.fetch(stage, key, out)) is not None:
                yield fetched
                return
            lease, holder = self._try_lease(stage, key)
            if lease is not None:
                break
            worker = holder.get("worker", "another worker")
            if worker != announced:  # once per holder, not at every renewal
                until = time.strftime("%H:%M:%S", time.localtime(float(holder.get("expires_at", 0))))
                log.info("%s: %s is being computed by %s; waiting for it (lease until %s, renewed while it works)",
                         stage, key, worker, until)
                announced = worker
            time.sleep(self.poll_s)
        with lease:
            if reuse and self.has(stage, key) and (fetched := self.fetch(stage, key, out)) is not None:
                yield fetched  # published by the previous holder just before it let go
                return
            yield None

    def _lease_dir(self, stage: str, key: str) -> str:
        return self._path("leases", stage, key)

    def _generations(self, stage: str, key: str) -> list[int]:
        self.fs.invalidate_cache(self._lease_dir(stage, key))
        try:
            names = self.fs.ls(self._lease_dir(stage, key), detail=False)
        except FileNotFoundError:
            return []
        stems = (n.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for n in names if n.endswith(".json"))
        return sorted(int(s) for s in stems if s.isdigit())

    def lease_record(self, stage: str, key: str, generation: int) -> dict:
        """A lease record; one being written (empty for a moment) reads as held until its file's mtime + TTL."""
        path = f"{self._lease_dir(stage, key)}/{generation}.json"
        try:
            return json.loads(self.fs.cat_file(path))
        except (ValueError, UnicodeDecodeError):
            modified = self.fs.modified(path).timestamp()
            return {"worker": "a worker", "expires_at": modified + self.lease_ttl_s}

    def live_lease(self, stage: str, key: str, generations: list[int] | None = None) -> dict | None:
        """The record of the stage's lease while a worker holds it (neither released nor expired), else None."""
        generations = self._generations(stage, key) if generations is None else generations
        if not generations:
            return None
        try:
            record = self.lease_record(stage, key, generations[-1])
        except FileNotFoundError:  # removed since the listing (a takeover, a prune): held until a fresh look
            return {"worker": "another worker", "expires_at": time.time() + self.lease_ttl_s}
        alive = not record.get("released") and float(record.get("expires_at", 0)) > time.time()
        return record if alive else None

    def _try_lease(self, stage: str, key: str) -> tuple[Lease | None, dict]:
        """(the lease, {}) when this worker takes it: there is none, or the last one expired or was released;
        else (None, the live record)."""
        generations = self._generations(stage, key)
        top = generations[-1] if generations else 0
        if (record := self.live_lease(stage, key, generations)) is not None:
            return None, record
        lease = Lease(self, stage, key, top + 1)
        if not lease.create():
            return None, {"worker": "another worker", "expires_at": time.time() + self.lease_ttl_s}
        for old in generations:  # dead generations: only the newest one is ever read
            with contextlib.suppress(OSError):
                self.fs.rm_file(f"{self._lease_dir(stage, key)}/{old}.json")
        return lease, {}


class Lease:
    """One generation of a stage's lease, held from `create` until the block ends. A thread renews it every
    third of the TTL; a SIGKILL stops the thread, so the lease expires and another worker takes over."""

    def __init__(self, store: SharedStageStore, stage: str, key: str, generation: int):
        self.store, self.stage, self.key, self.generation = store, stage, key, generation
        self.path = f"{store._lease_dir(stage, key)}/{generation}.json"
        self.worker = f"{socket.gethostname()} pid {os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{stage}", daemon=True)

    def _record(self, released: bool = False) -> bytes:
        expires = 0.0 if released else time.time() + self.store.lease_ttl_s
        return json.dumps({"worker": self.worker, "stage": self.stage, "key": self.key, "expires_at": expires,
                           "ttl_s": self.store.lease_ttl_s, "released": released}).encode()

    def create(self) -> bool:
        """Create this generation's record if no worker has; False when another worker was first."""
        fs = self.store.fs
        fs.makedirs(self.store._lease_dir(self.stage, self.key), exist_ok=True)
        try:
            with fs.open(self.path, "xb") as f:
                f.write(self._record())
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError) as exc:
            raise RuntimeError(f"the shared stage cache {self.store.url} cannot create a file only if it is absent "
                               f"({exc}); the lease needs that: use a mounted directory, s3:// or gs://") from exc
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.store.lease_ttl_s / 3):
            try:
                newest = self.store._generations(self.stage, self.key)
                if newest and newest[-1] != self.generation:
                    log.warning("%s: lost the lease on %s to another worker (renewal came too late); finishing "
                                "anyway, the copy it publishes is the same content", self.stage, self.key)
                    return
                self.store.fs.pipe_file(self.path, self._record())
            except OSError as exc:  # a store hiccup: try again at the next beat
                log.warning("%s: could not renew the lease on %s: %s", self.stage, self.key, exc)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            if self.store._generations(self.stage, self.key)[-1:] == [self.generation]:
                self.store.fs.pipe_file(self.path, self._record(released=True))
        except OSError as exc:
            log.warning("%s: could not release the lease on %s (it expires by itself): %s", self.stage, self.key, exc)
