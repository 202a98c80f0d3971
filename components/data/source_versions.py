"""What each remote data source holds now, asked at the start of a run: the fetch stage's key holds it.

Without it, the key of a hub dataset or an unpinned URL would be its description alone, and a
scheduled run would reuse its first fetch forever. Per source:

- an http(s) `url`: its ETag, else its Last-Modified, from a HEAD request; a server that gives
  neither (or refuses HEAD) is read once with a GET and keyed on the content's sha256;
- any other fsspec `url` (s3://, gs://, memory://, file://): the filesystem's `checksum` of the file,
  or of every file below a directory (the object's ETag, md5 or mtime, as the filesystem knows it);
- a hub dataset (`hf_hub_url`): the commit its `main` branch points at (huggingface_hub's
  dataset_info). Under HF_HUB_OFFLINE nothing is asked: the commit this config's last run recorded,
  else the one the local Hugging Face cache knows, is used, and a log line says so.

A `sha256` pin on a URL or a `revision` on a hub dataset is the version already: no request is made.
Local `file_name` sources are keyed on their content by `components.pipeline.source_fingerprints`.

A source that cannot be asked (no network, a 4xx, a missing object) is keyed on its description
alone, with a warning naming it; the fetch itself then fails or succeeds as it always did. A source
that changes between this look and the fetch costs one more fetch next run, never stale data: the
key then moves to the new version and the stages below see the same files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from components.data.dataset_info import DatasetSpec, load_dataset_info
from components.data.records import GROUP_KINDS

if TYPE_CHECKING:
    from components.config import PipelineConfig

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = (10, 60)  # (connect, read)
# HEAD answers that say "ask with GET instead", not "this URL is wrong".
_NO_HEAD = {405, 501}


class SourceUnreachable(Exception):
    """The current version of a source could not be asked for; the message says why."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def http_version(url: str) -> str:
    """The version an http(s) server gives `url`: `etag:...`, else `last-modified:...`, else the sha256 of
    the body (`sha256:...`, read with a GET)."""
    import requests

    try:
        r = requests.head(url, allow_redirects=True, timeout=_TIMEOUT_S)
        if r.status_code not in _NO_HEAD:
            if r.status_code >= 400:
                raise SourceUnreachable(f"HEAD {url}: HTTP {r.status_code} {r.reason}")
            if r.headers.get("ETag"):
                return f"etag:{r.headers['ETag']}"
            if r.headers.get("Last-Modified"):
                return f"last-modified:{r.headers['Last-Modified']}"
        digest = hashlib.sha256()
        with requests.get(url, stream=True, timeout=_TIMEOUT_S) as g:
            if g.status_code >= 400:
                raise SourceUnreachable(f"GET {url}: HTTP {g.status_code} {g.reason}")
            for block in g.iter_content(_CHUNK):
                digest.update(block)
        return f"sha256:{digest.hexdigest()}"
    except requests.RequestException as e:
        raise SourceUnreachable(f"{type(e).__name__}: {e}") from e


def fsspec_version(uri: str) -> str:
    """The filesystem's checksum of the object at `uri`, or a digest of every file's checksum below a directory."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        if not fs.isdir(root):
            if not fs.exists(root):
                raise SourceUnreachable(f"{uri} does not exist")
            return f"checksum:{fs.checksum(root)}"
        top = root.rstrip("/")
        lines = "".join(f"{fs.checksum(p)}  {p[len(top):]}\n" for p in sorted(fs.find(root)))
        return "checksums:" + hashlib.sha256(lines.encode()).hexdigest()
    except SourceUnreachable:
        raise
    except Exception as e:  # filesystems raise many types (OSError, an unknown protocol, a cloud SDK's own)
        raise SourceUnreachable(f"{type(e).__name__}: {e}") from e


def _cached_hub_commit(repo: str) -> str | None:
    """The commit the local Hugging Face cache maps the dataset's `main` to, if it was downloaded before."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def hub_version(repo: str) -> str:
    """The commit a hub dataset's `main` points at now (asked online only; see `source_version`)."""
    from huggingface_hub import HfApi

    try:
        return f"commit:{HfApi().dataset_info(repo).sha}"
    except Exception as e:  # the hub client raises many types (HTTP, offline mode, auth); say which source
        raise SourceUnreachable(f"{type(e).__name__}: {e}") from e


def _offline_hub_version(spec: DatasetSpec, known: str | None) -> str | None:
    """Under HF_HUB_OFFLINE: the commit this config's last run recorded, else the local cache's, else none."""
    cached = _cached_hub_commit(spec.hf_hub_url)
    if known:
        version, whence = known, "the one the last run recorded"
    elif cached:
        version, whence = f"commit:{cached}", "the one the local Hugging Face cache knows"
    else:
        version, whence = None, "its description alone"
    log.info("dataset '%s': HF_HUB_OFFLINE is set, so the hub is not asked for the current commit of %s; keyed on "
             "%s%s", spec.name, spec.hf_hub_url, whence, f" ({version})" if version else "")
    return version


def source_version(spec: DatasetSpec, known: str | None = None) -> str | None:
    """The current version of one source, or None where its description is its key already (a local file,
    a pinned `sha256` or `revision`) or it could not be asked (logged). `known` is what the last run of this
    config recorded for it: an offline hub dataset keeps it."""
    if spec.load_from == "file" or spec.sha256 or (spec.load_from == "hf_hub" and spec.revision):
        return None
    if spec.load_from == "hf_hub" and hub_offline():
        return _offline_hub_version(spec, known)
    what = spec.url or spec.hf_hub_url
    try:
        if spec.load_from == "hf_hub":
            return hub_version(spec.hf_hub_url)
        if urlparse(spec.url).scheme in ("http", "https"):
            return http_version(spec.url)
        return fsspec_version(spec.url)
    except SourceUnreachable as e:
        log.warning("dataset '%s': cannot ask %s for its current version (%s); its fetch is keyed on its "
                    "description alone this run", spec.name, what, e)
        return None


def resolve_source_versions(specs: Mapping[str, DatasetSpec], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """name -> current version of every remote, unpinned source among `specs` (others are left out)."""
    known = known or {}
    versions = {name: source_version(spec, known.get(name)) for name, spec in specs.items()}
    return {name: v for name, v in versions.items() if v is not None}


def current_source_versions(cfg: PipelineConfig) -> dict[str, str]:
    """The current versions of the remote sources `cfg.data` names, for the fetch stage's key."""
    from components.data.data_changes import recorded_versions

    names = sorted({n for g in GROUP_KINDS for n in getattr(cfg.data, g)})
    specs = load_dataset_info(Path(cfg.data.dataset_info), names, allow_outside=cfg.data.allow_outside_paths)
    if all(spec.load_from == "file" for spec in specs.values()):
        return {}
    return resolve_source_versions(specs, recorded_versions(cfg))
