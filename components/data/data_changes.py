"""What changed in the data since the last run of a config: which sources, and rows gained or lost.

A scheduled run re-reads its remote sources (components.data.source_versions); its summary then says
which of them changed since the previous run, e.g.
`data: icd10_remote changed since the last run (+12 rows, -0 rows)`.

The record of the last run is `<workspace>/data_versions/<digest of the data section>.json`: per
source, the version the fetch key held, the sha256 of the fetched copy and its row count, plus the
fetch directory. It is keyed by the config's `data` section (without `num_proc`), not by the whole
config: a run with other training settings reads the same data and keeps the history, while a run
with other datasets or sampling starts a record of its own.

A source changed when its fetched content did (a new ETag over the same bytes is a refetch, not a
change). Rows gained and lost are counted row by row (a multiset of row digests) against the previous
fetched copy while it is still in the workspace; once it is gone, only the two row counts compare.
Row counts come from the align stage's report when align ran (rows read, before sampling), else from
reading the fetched copy; only a new or changed dataset is read.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from components.artifacts import atomic_write_json, read_manifest, verify_manifest
from components.config import hash_json
from components.data.dataset_info import DataError, load_dataset_info
from components.data.fetch import RAW
from components.data.readers import ParseFailure, data_files, read_rows

if TYPE_CHECKING:
    from components.config import PipelineConfig

RECORD_DIR = "data_versions"


def record_path(cfg: PipelineConfig) -> Path:
    """Where the last run of this config's data section is recorded."""
    digest = hash_json(cfg.data.model_dump(mode="json", exclude={"num_proc"}))
    return Path(cfg.workspace) / RECORD_DIR / f"{digest[:16]}.json"


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # none yet, or damaged: this run starts the history over
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sources"), dict) else None


def recorded_versions(cfg: PipelineConfig) -> dict[str, str]:
    """name -> the source version the last run of this config keyed its fetch on."""
    record = _read_record(record_path(cfg)) or {"sources": {}}
    return {name: s["version"] for name, s in record["sources"].items() if s.get("version")}


@dataclass(frozen=True)
class SourceChange:
    """One source of this run against the last run of the same config."""

    name: str
    status: str  # "changed" | "new" | "refetched" (new version, same content) | "unchanged" | "first run"
    version: str | None = None
    rows_before: int | None = None
    rows_after: int | None = None
    gained: int | None = None  # counted row by row; None where the previous copy is gone
    lost: int | None = None


def row_digests(fetch_dir: Path, name: str) -> Counter[bytes]:
    """A multiset of digests of the rows of dataset `name` as fetched to `fetch_dir` (rows in any order)."""
    (spec,) = load_dataset_info(fetch_dir / "dataset_info.json", [name]).values()
    counts: Counter[bytes] = Counter()
    for path in data_files(fetch_dir / spec.file_name, name):
        for _, row in read_rows(path, path.name, spec):
            data = (row.snippet.encode() if isinstance(row, ParseFailure) else
                    orjson.dumps(row, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY, default=str))
            counts[hashlib.blake2b(data, digest_size=12).digest()] += 1
    return counts


def _aligned_rows(align_manifest: dict | None) -> dict[str, int]:
    """Rows read per dataset, from the align stage's report (a dataset in two groups is read twice alike)."""
    report_path = Path(align_manifest["dir"]) / "report.json" if align_manifest else None
    if report_path is None or not report_path.is_file():
        return {}
    rows: dict[str, int] = {}
    for datasets in json.loads(report_path.read_text(encoding="utf-8")).values():
        for name, r in datasets.items():
            rows[name] = max(rows.get(name, 0), int(r["rows_in"]))
    return rows


def _old_copy(record: dict) -> Path | None:
    """The previous run's fetch directory, when it is still complete."""
    if not record.get("fetch_dir"):
        return None
    manifest = read_manifest(Path(record["fetch_dir"]))
    return Path(manifest["dir"]) if verify_manifest(manifest) else None


def _row_change(name: str, fetch_dir: Path, old_dir: Path | None) -> tuple[int | None, int | None, int | None]:
    """(rows gained, rows lost, rows now) of a changed or new dataset; gained and lost need the previous copy.
    None where a copy cannot be read row by row."""
    try:
        now = row_digests(fetch_dir, name)
        if old_dir is None or not (old_dir / RAW / name).exists():
            return None, None, sum(now.values())
        was = row_digests(old_dir, name)
    except DataError:
        return None, None, None
    return sum((now - was).values()), sum((was - now).values()), sum(now.values())


def compare_with_last_run(cfg: PipelineConfig, fetch_manifest: dict, align_manifest: dict | None = None,
                          flow_run_id: str = "") -> list[SourceChange]:
    """Each source of this run's fetch against the last run of `cfg`'s data section, then record this run
    as the last one (written atomically). Only a new or changed dataset is read row by row."""
    fetch_dir = Path(fetch_manifest["dir"])
    provenance = json.loads((fetch_dir / "provenance.json").read_text(encoding="utf-8"))
    keyed = fetch_manifest.get("config", {}).get("sources", {})
    path = record_path(cfg)
    old = _read_record(path)
    old_dir = _old_copy(old) if old else None
    aligned = _aligned_rows(align_manifest)
    changes, sources = [], {}
    for name, prov in provenance.items():
        version = keyed.get(name, {}).get("version")
        before = (old or {"sources": {}})["sources"].get(name)
        if before is not None and before.get("sha256") == prov["sha256"]:
            status = "unchanged" if before.get("version") == version else "refetched"
            rows = aligned.get(name, before.get("rows"))
            change = SourceChange(name, status, version, before.get("rows"), rows)
        else:
            previous = old_dir if before else None
            if previous is None and name in aligned:  # nothing to count that align did not
                gained = lost = None
                rows = aligned[name]
            else:
                gained, lost, counted = _row_change(name, fetch_dir, previous)
                rows = aligned.get(name, counted)
            if before is None:
                change = SourceChange(name, "first run" if old is None else "new", version, rows_after=rows)
            else:
                change = SourceChange(name, "changed", version, before.get("rows"), rows, gained, lost)
        changes.append(change)
        sources[name] = {"version": version, "sha256": prov["sha256"], "rows": change.rows_after}
    atomic_write_json(path, {"fetch_dir": str(fetch_dir), "flow_run_id": flow_run_id,
                             "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sources": sources})
    return changes


def change_lines(changes: list[SourceChange]) -> list[str]:
    """The summary's lines about the data: one per changed, new or refetched source, or one saying nothing changed."""
    if changes and all(c.status == "first run" for c in changes):
        n = len(changes)
        return [f"data: first run of this data config; {n} source{'' if n == 1 else 's'} recorded"]
    lines = []
    for c in changes:
        if c.status == "changed":
            if c.gained is not None:
                rows = f"+{c.gained} rows, -{c.lost} rows"
            elif c.rows_before is not None and c.rows_after is not None:
                rows = (f"{c.rows_before} -> {c.rows_after} rows; the previous copy is gone, so rows gained and "
                        "lost are not told apart")
            else:
                rows = "row counts unknown"
            lines.append(f"data: {c.name} changed since the last run ({rows})")
        elif c.status == "new":
            lines.append(f"data: {c.name} is new since the last run"
                         + (f" ({c.rows_after} rows)" if c.rows_after is not None else ""))
        elif c.status == "refetched":
            lines.append(f"data: {c.name} was fetched again (its version is now {c.version}), same content")
    return lines or ["data: no source changed since the last run"]
