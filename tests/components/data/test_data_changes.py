"""The record of the last run's data per config, and the summary's lines about what changed since."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.artifacts import write_manifest
from components.config import load_config
from components.data.data_changes import change_lines, compare_with_last_run, record_path, recorded_versions
from components.data.fetch import run_fetch

ROW = '{{"text": "row {}"}}\n'


def _fetch(tmp_path: Path, run: int, rows: list[int], version: str) -> dict:
    """A complete fetch stage directory (with its manifest) of one local dataset `d` holding `rows`."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "d.jsonl").write_text("".join(ROW.format(i) for i in rows))
    (src / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl", "formatting": "text"}}))
    out = tmp_path / "artifacts" / "fetch" / f"k{run}"
    result = run_fetch(src / "dataset_info.json", ["d"], out)
    return write_manifest(out, stage="fetch", key=f"k{run}", result=result, wall_s=0.0, upstream={},
                          config={"sources": {"d": {"version": version}}})


def test_rows_gained_and_lost_are_counted_against_the_last_run(tmp_path: Path) -> None:
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}"])
    first = compare_with_last_run(cfg, _fetch(tmp_path, 1, list(range(10)), "etag:1"), flow_run_id="run-1")
    assert change_lines(first) == ["data: first run of this data config; 1 source recorded"]
    assert recorded_versions(cfg) == {"d": "etag:1"}

    # Rows 0-2 removed, 10-14 added, 3-9 moved around: +5, -3.
    changed = compare_with_last_run(cfg, _fetch(tmp_path, 2, [9, 8, 7, 6, 5, 4, 3, *range(10, 15)], "etag:2"))
    assert change_lines(changed) == ["data: d changed since the last run (+5 rows, -3 rows)"]
    assert (changed[0].rows_after, changed[0].version) == (12, "etag:2")
    record = json.loads(record_path(cfg).read_text())
    assert record["sources"]["d"]["rows"] == 12 and record["fetch_dir"].endswith("k2")

    same_bytes = compare_with_last_run(cfg, _fetch(tmp_path, 3, [9, 8, 7, 6, 5, 4, 3, *range(10, 15)], "etag:3"))
    assert change_lines(same_bytes) == ["data: d was fetched again (its version is now etag:3), same content"]
    unchanged = compare_with_last_run(cfg, _fetch(tmp_path, 3, [9, 8, 7, 6, 5, 4, 3, *range(10, 15)], "etag:3"))
    assert change_lines(unchanged) == ["data: no source changed since the last run"]

    shutil.rmtree(tmp_path / "artifacts" / "fetch" / "k3")  # the previous copy is gone: the counts alone compare
    gone = compare_with_last_run(cfg, _fetch(tmp_path, 4, list(range(20)), "etag:4"))
    assert change_lines(gone) == ["data: d changed since the last run (12 -> 20 rows; the previous copy is gone, "
                                  "so rows gained and lost are not told apart)"]


def test_row_counts_come_from_the_align_report_when_align_ran(tmp_path: Path) -> None:
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}"])
    compare_with_last_run(cfg, _fetch(tmp_path, 1, list(range(10)), "etag:1"))
    align = tmp_path / "align"
    align.mkdir()
    # The report's count is taken as is: here one the file does not hold (4 rows), to see which is used.
    (align / "report.json").write_text(json.dumps({"cpt": {"d": {"rows_in": 40}}, "cpt_eval": {"d": {"rows_in": 4}}}))
    shutil.rmtree(tmp_path / "artifacts" / "fetch" / "k1")
    changes = compare_with_last_run(cfg, _fetch(tmp_path, 2, list(range(4)), "etag:2"), {"dir": str(align)})
    assert change_lines(changes) == [
        "data: d changed since the last run (10 -> 40 rows; the previous copy is gone, so rows gained and lost are "
        "not told apart)"]


def test_the_record_is_per_data_section_and_a_new_source_is_named(tmp_path: Path) -> None:
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}"])
    trained_longer = load_config(None, [f"workspace={tmp_path / 'ws'}", "sft.max_steps=99"])
    other_data = load_config(None, [f"workspace={tmp_path / 'ws'}", "data.max_samples=7"])
    assert record_path(cfg) == record_path(trained_longer) != record_path(other_data)
    compare_with_last_run(cfg, _fetch(tmp_path, 1, [1, 2], "etag:1"))
    record = json.loads(record_path(cfg).read_text())
    record["sources"] = {"older": record["sources"]["d"]}  # as if `d` had not been fetched last time
    record_path(cfg).write_text(json.dumps(record))
    changes = compare_with_last_run(cfg, _fetch(tmp_path, 2, [1, 2], "etag:1"))
    assert change_lines(changes) == ["data: d is new since the last run (2 rows)"]


def test_a_damaged_record_starts_the_history_over(tmp_path: Path) -> None:
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}"])
    record_path(cfg).parent.mkdir(parents=True)
    record_path(cfg).write_text("{not json")
    assert recorded_versions(cfg) == {}
    changes = compare_with_last_run(cfg, _fetch(tmp_path, 1, [1], "etag:1"))
    assert [c.status for c in changes] == ["first run"]
