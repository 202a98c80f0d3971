"""A scheduled run sees new data: an unpinned URL source is asked for its current version at the start of
every run, so a changed file reruns fetch and the stages that read what changed, an unchanged one reruns
nothing, and the summary says which source changed and by how many rows. Runs stop after tokenize: the
stages below are keyed on tokenize's files like any other change (test_domain_adaptation.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_pipeline_config
from tests.servers import serving_directory

pytestmark = pytest.mark.e2e

ROWS = [f"ICD-10-CM code E11.{i} is in chapter 4, endocrine, nutritional and metabolic diseases." for i in range(6)]


def _ran(summary) -> dict[str, bool]:
    return {row["stage"]: not row["cached"] for row in summary["timeline"]}


def _serve(path: Path, rows: list[str], mtime: int) -> None:
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    os.utime(path, (mtime, mtime))


@pytest.mark.parametrize("validators", ["etag", "none"])
def test_a_changed_remote_file_reruns_what_reads_it_and_an_unchanged_one_nothing(
        validators, tiny_model_dir, tmp_path, prefect_harness):
    from flows.domain_adaptation import domain_adaptation

    served = tmp_path / "served"
    served.mkdir()
    remote = served / "remote.jsonl"
    _serve(remote, ROWS, 1_700_000_000)
    shipped = ROOT / "data" / "icd10" / "dataset_info.json"
    entries = json.loads(shipped.read_text())
    for entry in entries.values():
        entry["file_name"] = str(shipped.parent / entry["file_name"])
    with serving_directory(served, validators) as (base, handler):
        entries["icd10_remote"] = {"url": f"{base}/remote.jsonl", "formatting": "alpaca", "columns": {"prompt": "text"}}
        info = tmp_path / "dataset_info.json"
        info.write_text(json.dumps(entries))
        cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{
            "data.dataset_info": info, "data.cpt": "[icd10_corpus, icd10_remote]",
            "data.allow_outside_paths": "true"})  # the shipped files, named by absolute path

        def run() -> dict:
            return domain_adaptation(config=cfg, until="tokenize")

        first = run()
        assert all(_ran(first).values())
        assert first["data_changes"] == ["data: first run of this data config; 7 sources recorded"]

        _serve(remote, [*ROWS[1:], "I10 Essential (primary) hypertension.", "J45 Asthma."], 1_700_000_100)
        changed = run()
        assert _ran(changed) == {"prepare": False, "fetch": True, "align": True, "tokenize": True}
        assert changed["data_changes"] == ["data: icd10_remote changed since the last run (+2 rows, -1 rows)"]
        fetched = Path(changed["stages"]["fetch"]) / "raw" / "icd10_remote" / "remote.jsonl"
        assert fetched.read_bytes() == remote.read_bytes()

        unchanged = run()
        assert not any(_ran(unchanged).values()), _ran(unchanged)
        assert unchanged["data_changes"] == ["data: no source changed since the last run"]

        # Touched, same bytes: an ETag server gives a new version, so fetch runs again, but the files it
        # brings are the same and nothing below it reruns. A server without validators is hashed: no change.
        os.utime(remote, (1_700_000_200, 1_700_000_200))
        touched = run()
        if validators == "etag":
            assert _ran(touched) == {"prepare": False, "fetch": True, "align": False, "tokenize": False}
            assert touched["stages"]["align"] == unchanged["stages"]["align"]
            assert touched["data_changes"][0].startswith("data: icd10_remote was fetched again (its version is now "
                                                         'etag:"')
            assert {method for method, _ in handler.requests} == {"HEAD", "GET"}
        else:
            assert not any(_ran(touched).values()), _ran(touched)
            assert touched["data_changes"] == ["data: no source changed since the last run"]
