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
    """What a component returns: files it wrote (relative to its dir), metrics, extra facts."""

    files: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


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
    for rel in sorted(set(result.files)):
        p = out_dir / rel
        if not p.is_file():
            raise FileNotFoundError(f"stage {stage} reported {rel} but {p} does not exist")
        files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "stage": stage,
        "cache_key": key,
        "dir": str(out_dir.resolve()),
        "files": files,
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
    payload = {"stage": manifest["stage"], "cache_key": manifest["cache_key"], "files": manifest["files"]}
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
    """True when every file the manifest names is there with its size (and, if deep, its sha256)."""
    if not manifest:
        return False
    root = Path(manifest["dir"])
    for rel, meta in manifest["files"].items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return False
        if deep and sha256_file(p) != meta["sha256"]:
            return False
    return True


def reset_dir(path: Path) -> None:
    """Remove a stage directory's contents, keeping nothing from an earlier attempt."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
