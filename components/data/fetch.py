"""The fetch stage: dataset sources -> local raw files + provenance.

Sources, one per dataset_info.json entry: a local `file_name` (file or directory, next to the
dataset_info.json), a `url` (http(s), verified against its `sha256` pin when given), any other
fsspec URI in `url` (s3://, gs://, memory://, ...), or a hub dataset id in
`hf_hub_url` (loaded with `datasets.load_dataset`, at `revision` when given, and saved as parquet;
with `streaming=True` read as a stream and written row by row as JSONL, so no second copy lands in
the datasets cache and memory stays bounded however large the split is).

What a remote source holds now (ETag, checksum, hub commit) is asked before the run, for this stage's
cache key (components.data.source_versions), not here.

Only what can recover is retried, here and nowhere else: connection trouble, timeouts, HTTP
408/425/429/5xx and short reads, waiting as the server's Retry-After says (capped) or backing off.
A missing file, a 4xx or a pin mismatch fails at once. When the retries run out the last
`TransientError` is raised, so whatever runs the stage still sees a transient failure.

Each dataset lands whole or not at all in out_dir/raw/<name>/ (built next to it, then renamed);
out_dir/dataset_info.json describes the fetched copies (file_name relative to out_dir, so the align
stage and LLaMA-Factory can read it as is) and out_dir/provenance.json records where each dataset
came from, its size, sha256 and license note.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

import orjson

from components.artifacts import StageResult, atomic_dir, atomic_file, atomic_write_json, sha256_file
from components.data.dataset_info import DataError, DatasetSpec, load_dataset_info, local_files
from components.data.records import GROUP_KINDS
from components.errors import TransientError
from components.runtime import progress

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

RAW = "raw"
_CHUNK = 1 << 20
_BACKOFF_S = 0.5  # first retry waits this long, then twice as long each time
MAX_RETRY_AFTER_S = 60.0  # a server asking for a longer wait gets this; the stage is not parked for hours
# Statuses a retry can cure (timeout, too early, rate limit, server trouble); any other 4xx or 5xx cannot.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Entry fields that name a remote source: the fetched copy is described by file_name alone.
_SOURCE_FIELDS = {"url", "sha256", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name",
                  "file_sha1", "subset", "split", "folder", "revision"}
T = TypeVar("T")


def _with_retries(what: str, attempt: Callable[[], T], retries: int) -> T:
    """`attempt()`, tried again up to `retries` times while it raises TransientError."""
    for n in range(retries + 1):
        try:
            return attempt()
        except TransientError as e:
            if n == retries:
                raise TransientError(f"{what} failed after {n + 1} attempts: {e}", e.retry_after_s) from e
            wait = e.retry_after_s if e.retry_after_s is not None else _BACKOFF_S * 2**n
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, e, n + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def retry_after_s(header: str | None, now: datetime | None = None) -> float | None:
    """The wait a Retry-After header asks for (delay-seconds or an HTTP-date), capped at MAX_RETRY_AFTER_S.

    >>> retry_after_s("1"), retry_after_s("3600"), retry_after_s("soon")
    (1.0, 60.0, None)
    >>> retry_after_s("Wed, 21 Oct 2026 07:28:30 GMT", now=datetime(2026, 10, 21, 7, 28, tzinfo=timezone.utc))
    30.0
    """
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        seconds = float(header)
    else:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _stream_to_file(chunks: Callable[[IO[bytes]], None], dest: Path) -> tuple[int, str]:
    """Write what `chunks` writes to a temp file next to `dest`, hashing it; rename when complete."""
    with atomic_file(dest, "wb") as raw:
        hashing = _HashingWriter(raw)
        chunks(hashing)
    return hashing.size, hashing.sha256.hexdigest()


class _HashingWriter:
    def __init__(self, f: IO[bytes]):
        self.f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, block: bytes) -> int:
        self.sha256.update(block)
        self.size += len(block)
        return self.f.write(block)


def _check_pin(source: str, expected: str | None, actual: str) -> None:
    if expected and expected != actual:
        raise DataError(f"sha256 mismatch for {source}: expected {expected}, got {actual}. The file changed "
                        "at the source or the pin is wrong; check it, then update `sha256` in dataset_info.json")


def _url_file_name(url: str) -> str:
    name = PurePosixPath(urlparse(url).path).name
    return name or "data"


def _download_http(url: str, dest: Path, expected: str | None, retries: int) -> None:
    import requests

    def attempt() -> None:
        try:
            with requests.get(url, stream=True, timeout=(10, 60)) as r:
                if r.status_code in _RETRY_STATUS:
                    raise TransientError(f"HTTP {r.status_code} {r.reason}", retry_after_s(r.headers.get("Retry-After")))
                if r.status_code >= 400:
                    raise DataError(f"download of {url} failed: HTTP {r.status_code} {r.reason}; retrying would "
                                    "get the same answer: check `url` (and access to it) in dataset_info.json")
                # With a Content-Encoding, requests decodes and Content-Length counts the encoded bytes.
                encoded = r.headers.get("Content-Encoding", "identity") != "identity"
                total = None if encoded else int(r.headers.get("Content-Length") or 0) or None

                def chunks(out: IO[bytes]) -> None:
                    with progress(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                        for block in r.iter_content(_CHUNK):
                            out.write(block)
                            bar.update(len(block))

                size, digest = _stream_to_file(chunks, dest)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        if total is not None and size != total:
            raise TransientError(f"short read: {size} of {total} bytes")
        _check_pin(url, expected, digest)

    _with_retries(f"download of {url}", attempt, retries)


def _copy_fsspec(uri: str, dest_dir: Path, expected: str | None, retries: int) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    local = "file" in protocols  # a local file's error is the same on every try
    try:
        is_dir = fs.isdir(root)
    except OSError as e:
        raise DataError(f"cannot reach {uri}: {e}") from e
    if is_dir and expected:
        raise DataError(f"{uri} is a directory; a sha256 pin applies to a single file")
    if is_dir:
        top = PurePosixPath(root.rstrip("/"))
        sources = [(p, PurePosixPath(p).relative_to(top).as_posix()) for p in fs.find(root)]
        dest_root = dest_dir / (top.name or "data")
        if not sources:
            raise DataError(f"{uri} is an empty directory")
    elif fs.exists(root):
        sources = [(root, _url_file_name(uri))]
        dest_root = dest_dir
    else:
        raise DataError(f"{uri} does not exist")
    for remote, rel in sources:
        def attempt(remote: str = remote, rel: str = rel) -> None:
            try:
                with fs.open(remote, "rb") as src:
                    _, digest = _stream_to_file(lambda out: shutil.copyfileobj(src, out, _CHUNK), dest_root / rel)
            except FileNotFoundError as e:
                raise DataError(f"{uri}: {remote} does not exist") from e
            except (OSError, TimeoutError) as e:
                if local or isinstance(e, PermissionError):
                    raise DataError(f"{uri}: cannot read {remote}: {e}") from e
                raise TransientError(f"{type(e).__name__}: {e}") from e
            _check_pin(uri, expected, digest)

        _with_retries(f"copy of {remote}", attempt, retries)


def _copy_local(spec: DatasetSpec, info_path: Path, dest_dir: Path, allow_outside: bool) -> Path:
    src = info_path.parent / spec.file_name
    if not src.exists():
        raise DataError(f"dataset '{spec.name}': file_name '{spec.file_name}' not found (looked at {src})")
    files = local_files(spec, info_path, allow_outside=allow_outside)
    if src.is_file():
        pairs = [(src, dest_dir / src.name)]
    else:
        pairs = [(p, dest_dir / src.name / p.relative_to(src)) for p in files]
        if not pairs:
            raise DataError(f"dataset '{spec.name}': directory {src} holds no files")
    for a, b in pairs:
        with open(a, "rb") as f:
            _stream_to_file(lambda out, f=f: shutil.copyfileobj(f, out, _CHUNK), b)
    return src.resolve()


def _fetch_hub(spec: DatasetSpec, dest_dir: Path, streaming: bool, retries: int) -> str | None:
    """Load a hub dataset split and save it as parquet (or stream it to JSONL); returns the license
    the hub states, if any."""
    import datasets  # heavy import, only for hub sources

    pin = f", revision={spec.revision}" if spec.revision else ""
    what = f"{spec.hf_hub_url!r} (subset={spec.subset}, split={spec.split}{pin})"
    kwargs = {"streaming": True} if streaming else {}
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        ds = datasets.load_dataset(spec.hf_hub_url, name=spec.subset, data_dir=spec.folder, split=spec.split, **kwargs)
    except Exception as e:  # the hub client raises many types; say which dataset, keep the cause
        raise DataError(f"dataset '{spec.name}': cannot load {what} from the Hugging Face hub: {e}") from e
    if streaming:
        dest = dest_dir / f"{spec.split}.jsonl"
        _with_retries(f"streaming {what}", lambda: _stream_rows(spec.name, ds, dest), retries)
        return ds.info.license or None
    ds.to_parquet(str(dest_dir / f"{spec.split}.parquet"))  # dest_dir is renamed into place only when complete
    return ds.info.license or None


def _stream_rows(name: str, rows: Iterable[dict], dest: Path) -> None:
    """Write a stream of rows to `dest` as JSONL, atomically: a broken stream leaves no file."""
    row_no = 0
    try:
        with atomic_file(dest, "wb") as f:
            bar = progress(rows, desc=f"stream {name}", unit=" rows", leave=False)
            for row_no, row in enumerate(bar, 1):
                f.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
    except orjson.JSONEncodeError as e:
        raise DataError(f"dataset '{name}': row {row_no} of the stream: {e}. Streaming writes JSONL, which holds "
                        "text and numbers; set data.streaming: false to save this dataset as parquet instead") from None
    except (OSError, TimeoutError) as e:  # connection trouble mid-stream: start the stream over
        raise TransientError(f"stream broke after {row_no} rows: {type(e).__name__}: {e}") from e


def _fetch_one(spec: DatasetSpec, info_path: Path, dest_dir: Path, streaming: bool, retries: int,
               allow_outside: bool) -> tuple[str, str | None]:
    """Fetch one dataset into `dest_dir`; returns (where it came from, the license the hub states)."""
    if spec.load_from == "file":
        return str(_copy_local(spec, info_path, dest_dir, allow_outside)), None
    if spec.load_from == "url" and urlparse(spec.url).scheme in ("http", "https"):
        _download_http(spec.url, dest_dir / _url_file_name(spec.url), spec.sha256, retries)
        return spec.url, None
    if spec.load_from == "url":
        _copy_fsspec(spec.url, dest_dir, spec.sha256, retries)
        return spec.url, None
    return f"hf_hub:{spec.hf_hub_url}", _fetch_hub(spec, dest_dir, streaming, retries)


def _dir_digest(files: dict[str, dict]) -> str:
    """One digest for several files: sha256 of `sha256sum`-style lines, sorted by path."""
    lines = "".join(f"{meta['sha256']}  {rel}\n" for rel, meta in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def run_fetch(
    dataset_info_path: Path, names: list[str], out_dir: Path, *, retries: int = 3, streaming: bool = False,
    allow_outside: bool = False,
) -> StageResult:
    """Fetch the datasets `names` of a dataset_info.json into out_dir/raw/<name>/.

    `streaming` reads hub datasets as streams (see the module docstring); other sources are
    always copied chunk by chunk. `allow_outside` (data.allow_outside_paths) lets a local file_name lead
    outside the dataset_info.json's directory.

    Writes out_dir/dataset_info.json (those entries, file_name pointing at the fetched copies) and
    out_dir/provenance.json (per dataset: source, bytes, sha256, files, license note).
    """
    dataset_info_path, out_dir = Path(dataset_info_path), Path(out_dir)
    specs = load_dataset_info(dataset_info_path, names, allow_outside=allow_outside)
    entries: dict[str, dict] = {}
    provenance: dict[str, dict] = {}
    raw_files: list[str] = []
    for name, spec in specs.items():
        dest_dir = out_dir / RAW / name
        with atomic_dir(dest_dir) as building:
            source, hub_license = _fetch_one(spec, dataset_info_path, building, streaming, retries, allow_outside)
        written = sorted(p for p in dest_dir.rglob("*") if p.is_file())
        files = {p.relative_to(out_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in written}
        raw_files += files
        children = list(dest_dir.iterdir())
        local = children[0] if len(children) == 1 else dest_dir  # the file or directory that was fetched
        entry = {k: v for k, v in spec.to_entry().items() if k not in _SOURCE_FIELDS}
        entry["file_name"] = local.relative_to(out_dir).as_posix()
        entries[name] = entry
        license_note = spec.tags.get("license") or hub_license
        provenance[name] = {
            "source": source,
            "load_from": spec.load_from,
            "sha256_pinned": bool(spec.sha256),
            "bytes": sum(f["bytes"] for f in files.values()),
            "sha256": next(iter(files.values()))["sha256"] if len(files) == 1 else _dir_digest(files),
            "files": files,
            "license": license_note or "not stated: add tags.license to this entry of dataset_info.json",
        }
        if spec.load_from == "url" and not spec.sha256:
            log.warning("dataset '%s': %s has no sha256 pin; fetched sha256 %s", name, spec.url,
                        provenance[name]["sha256"])
        log.info("fetched '%s' from %s: %d files, %d bytes", name, source, len(files), provenance[name]["bytes"])

    atomic_write_json(out_dir / "dataset_info.json", entries)
    atomic_write_json(out_dir / "provenance.json", provenance)
    total = sum(p["bytes"] for p in provenance.values())
    reports = ["dataset_info.json", "provenance.json"]
    return StageResult(
        files=[*raw_files, *reports], reports=reports,
        metrics={"bytes": total, "files": len(raw_files)},
        info={"datasets": list(specs)},
    )


def fetch_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """The pipeline's fetch stage: every dataset named by a data group of `cfg.data`."""
    names = sorted({name for group in GROUP_KINDS for name in getattr(cfg.data, group)})
    return run_fetch(Path(cfg.data.dataset_info), names, out_dir, streaming=cfg.data.streaming,
                     allow_outside=cfg.data.allow_outside_paths)
