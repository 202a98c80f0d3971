"""Content-addressed stage directories and their manifests.

Every stage writes into `artifacts/<stage>/<cache_key>/` and writes `manifest.json` last:
the manifest is the complete marker. A directory without one is debris from a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

MANIFEST = "manifest.json"
_TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "mlflow", "prefect")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write a file through a temp file in the same directory, fsync, rename: readers never see half
    a file, and a failure (or kill -9) leaves at most a hidden .tmp file, never a partial `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class StageResult:
    """What a component returns: files it wrote (relative to its dir), metrics, extra facts, and which of
    its files are reports a person reads (summaries, curves, sample answers: small files, never weights or
    data), which the task layer attaches to the stage's MLflow run. Reports are hashed into the manifest like
    `files`, listed there or not."""

    files: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)


def stage_dir(workspace: Path | str, stage: str, key: str) -> Path:
    return Path(workspace) / "artifacts" / stage / key


def write_manifest(
    out_dir: Path,
    *,
    stage: str,
    key: str,
    result: StageResult,
    config: dict,
    upstream: dict[str, str],
    wall_s: float,
    extra: dict | None = None,
) -> dict:
    """Hash every file the stage produced and write the manifest last (the complete marker)."""
    files = {}
    for rel in sorted({*result.files, *result.reports}):
        p = out_dir / rel
        if not p.is_file():
            raise FileNotFoundError(f"stage {stage} reported {rel} but {p} does not exist")
        st = p.stat()
        files[rel] = {"sha256": sha256_file(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    manifest = {
        "stage": stage,
        "cache_key": key,
        "dir": str(out_dir.resolve()),
        "files": files,
        "reports": sorted(set(result.reports)),
        "metrics": result.metrics,
        "info": result.info,
        "config": config,
        "upstream": upstream,
        "wall_s": round(wall_s, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": package_versions(),
        **(extra or {}),
    }
    # The digest covers what downstream stages depend on: the key and file contents, not timings.
    manifest["digest"] = manifest_digest(manifest)
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def manifest_digest(manifest: dict) -> str:
    # Content only: touching a file (a new mtime) must not change what downstream keys see.
    files = {rel: {"sha256": m["sha256"], "bytes": m["bytes"]} for rel, m in manifest["files"].items()}
    payload = {"stage": manifest["stage"], "cache_key": manifest["cache_key"], "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def verify_manifest(manifest: dict | None, deep: bool = False) -> bool:
    """True when every file the manifest names is there, unchanged.

    By default a file is unchanged when its size and mtime match; one whose mtime moved (a copy,
    a touch) is rehashed rather than distrusted. `deep` rehashes every file (`lmforge run --verify deep`).
    """
    if not manifest:
        return False
    root = Path(manifest["dir"])
    for rel, meta in manifest["files"].items():
        p = root / rel
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_size != meta["bytes"]:
            return False
        if (deep or st.st_mtime_ns != meta.get("mtime_ns")) and sha256_file(p) != meta["sha256"]:
            return False
    return True


def reset_dir(path: Path) -> None:
    """Remove a stage directory's contents, keeping nothing from an earlier attempt."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def file_fingerprint(path: Path, full_hash_limit: int = 256 << 20) -> str:
    """Content hash of a local source file (size + mtime for files beyond the limit, to keep keys cheap)."""
    st = Path(path).stat()
    if st.st_size > full_hash_limit:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    return sha256_file(Path(path))


def remembered_sha256(paths: list[Path], memo_file: Path) -> list[str]:
    """sha256 of each (large) file, read once per (size, mtime) and remembered in `memo_file`.

    Model weights are gigabytes: a key must know their content, but reading 10 GB on every run is
    not acceptable. A copy with a new mtime is hashed once more and gives the same digest. The memo
    is read once and written once per call, however many files.
    """
    try:
        memo = json.loads(Path(memo_file).read_text())
    except (OSError, ValueError):
        memo = {}
    digests, changed = [], False
    for path in paths:
        path = Path(path).resolve()
        st = path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        hit = memo.get(str(path))
        if not (hit and hit.get("stamp") == stamp):
            hit = memo[str(path)] = {"stamp": stamp, "sha256": sha256_file(path)}
            changed = True
        digests.append(hit["sha256"])
    if changed:
        atomic_write_json(Path(memo_file), memo)
    return digests


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a temp directory next to `target`, renamed to `target` when the block succeeds.

    An existing `target` is replaced only then; on any failure (or kill -9) the temp directory goes
    (or stays hidden as `.<name>.*.tmp`) and `target` is left as it was: never half written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            # A rename cannot replace a non-empty directory: move the old one aside, then delete it.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
