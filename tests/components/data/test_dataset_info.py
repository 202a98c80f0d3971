"""dataset_info.json: LLaMA-Factory entries read as is, bad entries named by file, dataset and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from components.data.dataset_info import DataError, DatasetSpec, Formatting, load_dataset_info, local_files
from components.data.formats import CONVERTERS
from tests.components.data.conftest import FIXTURE_GROUPS, FIXTURES


def _write(tmp_path: Path, info: object) -> Path:
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(info))
    return path


def test_fixture_descriptions_load() -> None:
    specs = load_dataset_info(FIXTURES / "dataset_info.json", list(FIXTURE_GROUPS))
    assert list(specs) == list(FIXTURE_GROUPS)
    assert specs["icd10_sharegpt_tools"].formatting == "sharegpt"
    assert specs["icd10_alpaca_preference"].ranking is True
    assert specs["icd10_alpaca"].load_from == "file"


def test_llamafactory_entries_are_read_as_is(tmp_path: Path) -> None:
    entries = {
        "hub": {"hf_hub_url": "org/icd10", "ms_hub_url": "org/icd10", "subset": "en", "split": "validation",
                "folder": "data", "formatting": "sharegpt", "num_samples": 100},
        "local": {"file_name": "data.json", "file_sha1": "abc", "columns": {"prompt": "instruction"}},
    }
    specs = load_dataset_info(_write(tmp_path, entries), ["hub", "local"])
    assert specs["hub"].load_from == "hf_hub" and specs["hub"].split == "validation"
    assert specs["local"].to_entry() == {"file_name": "data.json", "file_sha1": "abc",
                                         "columns": {"prompt": "instruction"}}


@pytest.mark.parametrize("entry, message", [
    ({"file_name": "a.json", "formating": "alpaca"}, "field 'formating': Extra inputs are not permitted"),
    ({"file_name": "a.json", "columns": {"promt": "x"}}, "field 'columns': Value error, unknown key 'promt'"),
    ({"file_name": "a.json", "columns": {"images": "img"}}, "multimodal data is not supported"),
    ({"file_name": "a.json", "tags": {"role": "from"}}, "field 'tags': Value error, unknown key 'role'"),
    ({"file_name": "a.json", "ranking": "maybe"}, "field 'ranking'"),
    ({"url": "https://example.org/a.jsonl", "sha256": "xyz"}, "field 'sha256': Value error, must be 64 hex"),
    ({"file_name": "a.json", "url": "https://example.org/a.jsonl"}, "give one source, not file_name and url"),
    ({"formatting": "alpaca"}, "no source: give file_name, url or hf_hub_url"),
    ({"ms_hub_url": "org/x"}, "ms_hub_url is not supported"),
    ({"file_name": "a.json", "formatting": "xml"}, "field 'formatting': Input should be 'alpaca', 'sharegpt'"),
])
def test_bad_entry_names_file_dataset_and_field(tmp_path: Path, entry: dict, message: str) -> None:
    path = _write(tmp_path, {"icd10": entry})
    with pytest.raises(DataError) as e:
        load_dataset_info(path, ["icd10"])
    assert str(e.value).startswith(f"{path}: dataset 'icd10': ")
    assert message in str(e.value)


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    path = _write(tmp_path, {"b": {"file_name": "b.json"}, "a": {"file_name": "a.json"}})
    with pytest.raises(DataError, match=r"dataset 'c' not in .*; known: a, b$"):
        load_dataset_info(path, ["a", "c"])


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_info(tmp_path / "missing.json", ["a"])
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": {"file_name": "a.json"},,\n}')
    with pytest.raises(DataError, match=r"bad\.json:2:32: not valid JSON"):
        load_dataset_info(bad, ["a"])


def test_every_formatting_has_a_converter() -> None:
    assert set(get_args(Formatting)) == set(CONVERTERS)
    assert DatasetSpec(name="d", file_name="d.json").formatting == "alpaca"


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd", "data/../../secret.txt", "escape.txt"])
def test_a_file_name_leading_outside_its_directory_is_refused(tmp_path: Path, file_name: str) -> None:
    (tmp_path / "secret.txt").write_text("not data\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "escape.txt").symlink_to(tmp_path / "secret.txt")  # a symlink inside that points out
    info = _write(src, {"d": {"file_name": file_name, "formatting": "text"}})
    with pytest.raises(DataError, match=rf"{info}: dataset 'd': file_name '{file_name}' leads outside {src} "
                                        r"\(to .*\)\. .*set data\.allow_outside_paths: true"):
        load_dataset_info(info, ["d"])
    assert load_dataset_info(info, ["d"], allow_outside=True)["d"].file_name == file_name  # the user's opt-in


def test_files_inside_the_directory_are_read_however_named(tmp_path: Path) -> None:
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "rows" / "a.jsonl")  # a symlink that stays inside
    info = _write(tmp_path, {"abs": {"file_name": str(tmp_path / "rows")}, "dots": {"file_name": "rows/../link.jsonl"}})
    specs = load_dataset_info(info, ["abs", "dots"])
    assert local_files(specs["abs"], info) == [tmp_path / "rows" / "a.jsonl"]
    assert local_files(specs["dots"], info) == [tmp_path / "rows" / ".." / "link.jsonl"]


def test_a_symlink_in_a_dataset_directory_leading_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("not data\n")
    notes = tmp_path / "src" / "notes"
    notes.mkdir(parents=True)
    (notes / "a.txt").write_text("I10 Essential (primary) hypertension\n")
    (notes / "b.txt").symlink_to(tmp_path / "secret.txt")
    info = _write(tmp_path / "src", {"d": {"file_name": "notes", "formatting": "text"}})
    (spec,) = load_dataset_info(info, ["d"]).values()  # the directory itself is inside
    with pytest.raises(DataError, match=rf"dataset 'd': file_name 'notes' leads outside .*secret\.txt"):
        local_files(spec, info)
    assert local_files(spec, info, allow_outside=True) == [notes / "a.txt", notes / "b.txt"]
