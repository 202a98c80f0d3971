"""The align stage: golden outputs per format, the report, sampling and every bad-input error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from components.artifacts import StageResult
from components.data.align import format_report, iter_records, run_align
from components.data.dataset_info import DataError
from components.data.fetch import run_fetch
from components.data.mixing import interleave
from tests.components.data.conftest import FIXTURE_GROUPS, FIXTURES

ROOT = Path(__file__).resolve().parents[3]


def _golden(name: str) -> list[dict]:
    return list(iter_records(FIXTURES / "golden" / f"{name}.jsonl"))


@pytest.fixture
def fetched(formats_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "fetch"
    run_fetch(formats_dir / "dataset_info.json", list(FIXTURE_GROUPS), out)
    return out


def _write(tmp_path: Path, info: dict, files: dict[str, str]) -> Path:
    """A fetch-stage directory by hand: dataset_info.json + files under raw/."""
    root = tmp_path / "fetch"
    root.mkdir()
    for name, text in files.items():
        (root / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "raw" / name).write_text(text)
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("name", list(FIXTURE_GROUPS))
def test_every_fixture_aligns_to_its_golden_file(fetched: Path, tmp_path: Path, name: str) -> None:
    group = FIXTURE_GROUPS[name]
    result = run_align(fetched, {group: [name]}, tmp_path / "align")
    assert list(iter_records(tmp_path / "align" / f"{group}.jsonl")) == _golden(name)
    assert result.files == [f"{group}.jsonl", "report.json"]
    assert result.metrics[f"rows_kept_{group}"] == len(_golden(name))


def test_groups_concatenate_datasets_in_order(fetched: Path, tmp_path: Path) -> None:
    groups: dict[str, list[str]] = {}
    for name, group in FIXTURE_GROUPS.items():
        groups.setdefault(group, []).append(name)
    result = run_align(fetched, groups, tmp_path / "align")
    for group, names in groups.items():
        expected = [record for name in names for record in _golden(name)]
        assert list(iter_records(tmp_path / "align" / f"{group}.jsonl")) == expected
    report = json.loads((tmp_path / "align" / "report.json").read_text())
    assert set(report) == set(groups)
    for group, datasets in report.items():
        for r in datasets.values():  # every row read is kept, dropped or sampled out
            dropped = sum(d["count"] for d in r["dropped"].values())
            assert r["rows_in"] == r["rows_kept"] + dropped + r["rows_sampled_out"]
        assert result.metrics[f"rows_kept_{group}"] == sum(r["rows_kept"] for r in datasets.values())
    assert sorted(result.files) == sorted([f"{g}.jsonl" for g in groups] + ["report.json"])


def test_report_counts_drop_reasons_with_examples(fetched: Path, formats_dir: Path, tmp_path: Path) -> None:
    result = run_align(fetched, {"sft": ["icd10_alpaca", "icd10_sharegpt_tools"],
                                 "preference": ["icd10_alpaca_preference"], "cpt": ["icd10_pretrain"]},
                       tmp_path / "align")
    report = json.loads((tmp_path / "align" / "report.json").read_text())
    alpaca = report["sft"]["icd10_alpaca"]
    assert (alpaca["rows_in"], alpaca["rows_kept"]) == (4, 3)
    assert alpaca["dropped"]["empty_response"]["count"] == 1
    example = alpaca["dropped"]["empty_response"]["examples"][0]
    assert example["at"] == f"{(formats_dir / 'alpaca_sft.json').resolve()}[3]"  # the user's file, not the copy
    assert example["field"] == "output"
    assert "hyperlipidemia" in example["row"]
    order = report["sft"]["icd10_sharegpt_tools"]["dropped"]["invalid_role_order"]
    assert order["count"] == 1 and "message 1 is user after user" in order["examples"][0]["message"]
    assert report["preference"]["icd10_alpaca_preference"]["dropped"]["chosen_equals_rejected"]["count"] == 1
    assert report["cpt"]["icd10_pretrain"]["dropped"]["empty_text"]["count"] == 1
    assert result.metrics["rows_dropped_sft"] == 2
    assert result.metrics["rows_kept_sft"] == 5
    table = format_report(report)
    assert "icd10_alpaca" in table and "empty_response=1" in table and "invalid_role_order=1" in table


def test_a_row_mended_to_be_kept_is_counted_apart_from_the_drops(fetched: Path, formats_dir: Path,
                                                                  tmp_path: Path) -> None:
    run_align(fetched, {"sft": ["icd10_lmflow_trailing_user"]}, tmp_path / "align")
    report = json.loads((tmp_path / "align" / "report.json").read_text())["sft"]["icd10_lmflow_trailing_user"]
    assert (report["rows_in"], report["rows_kept"]) == (3, 2)
    assert report["dropped"]["invalid_role_order"]["count"] == 1  # a lone user turn: nothing to keep
    trimmed = report["adjusted"]["trailing_user_turn_trimmed"]
    assert trimmed["count"] == 1
    assert trimmed["examples"][0]["at"] == f"{(formats_dir / 'lmflow_conversation_trailing_user.json').resolve()}[0]"
    assert trimmed["examples"][0]["row"].startswith('{"type": "conversation", "instance": {"conversation_id": 1')
    assert "invalid_role_order=1; kept after a fix: trailing_user_turn_trimmed=1" in format_report({"sft": {
        "icd10_lmflow_trailing_user": report}})


def test_report_keeps_at_most_three_examples(tmp_path: Path) -> None:
    rows = [{"instruction": f"Code for case {i}?", "input": "", "output": ""} for i in range(5)]
    rows.append({"instruction": "Code for essential hypertension?", "input": "", "output": "I10"})
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl"}}, {"d.jsonl": _jsonl(rows)})
    run_align(root, {"sft": ["d"]}, tmp_path / "align")
    dropped = json.loads((tmp_path / "align" / "report.json").read_text())["sft"]["d"]["dropped"]
    assert dropped["empty_response"]["count"] == 5
    assert [e["at"] for e in dropped["empty_response"]["examples"]] == ["raw/d.jsonl:1", "raw/d.jsonl:2",
                                                                         "raw/d.jsonl:3"]


def test_sampling_is_seeded_and_keeps_file_order(tmp_path: Path) -> None:
    rows = [{"text": f"code {i}"} for i in range(50)]
    info = {"d": {"file_name": "raw/d.jsonl", "formatting": "text", "num_samples": 20}}
    root = _write(tmp_path, info, {"d.jsonl": _jsonl(rows)})

    def sample(out: str, **kwargs) -> list[str]:
        run_align(root, {"cpt": ["d"]}, tmp_path / out, **kwargs)
        return [r["text"] for r in iter_records(tmp_path / out / "cpt.jsonl")]

    first, again, other_seed, capped = sample("a"), sample("b"), sample("c", seed=7), sample("d", max_samples=5)
    assert len(first) == 20 and first == again and first != other_seed
    assert first == sorted(first, key=lambda t: int(t.split()[1]))
    assert len(capped) == 5
    report = json.loads((tmp_path / "d" / "report.json").read_text())["cpt"]["d"]
    assert (report["rows_in"], report["rows_kept"], report["rows_sampled_out"]) == (50, 5, 45)
    assert "(+45 sampled out)" in format_report({"cpt": {"d": report}})


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    text = '{"text": "E11.9"}\n{"text": "I10",}\n{"text": "J18.9"}\n'
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl", "formatting": "text"}}, {"d.jsonl": text})
    with pytest.raises(DataError, match=r"raw/d\.jsonl:2: malformed JSON: Expecting property name") as e:
        run_align(root, {"cpt": ["d"]}, tmp_path / "align")
    assert "bad_row_budget" in str(e.value)
    assert not (tmp_path / "align" / "cpt.jsonl").exists()  # nothing half-written


def test_bad_row_budget_skips_and_counts_malformed_lines(tmp_path: Path) -> None:
    text = '{"text": "E11.9"}\n{"text": "I10",}\nnot json\n{"text": "J18.9"}\n'
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl", "formatting": "text"}}, {"d.jsonl": text})
    with pytest.raises(DataError, match=r"d\.jsonl:3: .*more than bad_row_budget=1"):
        run_align(root, {"cpt": ["d"]}, tmp_path / "a", bad_row_budget=1)
    run_align(root, {"cpt": ["d"]}, tmp_path / "b", bad_row_budget=2)
    assert [r["text"] for r in iter_records(tmp_path / "b" / "cpt.jsonl")] == ["E11.9", "J18.9"]
    report = json.loads((tmp_path / "b" / "report.json").read_text())["cpt"]["d"]
    assert report["dropped"]["malformed_json"]["count"] == 2
    assert report["dropped"]["malformed_json"]["examples"][1] == {
        "at": "raw/d.jsonl:3", "field": None, "message": "malformed JSON: Expecting value (column 1)",
        "row": "not json"}


def test_malformed_json_document_names_file_line_and_column(tmp_path: Path) -> None:
    root = _write(tmp_path, {"d": {"file_name": "raw/d.json"}}, {"d.json": '[\n  {"instruction": "x",\n]\n'})
    with pytest.raises(DataError, match=r"raw/d\.json:3:1: not valid JSON"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


def test_column_mapping_mismatch_lists_columns_found(tmp_path: Path) -> None:
    rows = [{"question": "Code for essential hypertension?", "answer": "I10"}]
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl"}}, {"d.jsonl": _jsonl(rows)})
    with pytest.raises(DataError) as e:
        run_align(root, {"sft": ["d"]}, tmp_path / "align")
    message = str(e.value)
    assert "no column 'instruction' (columns.prompt)" in message
    assert "columns found in the file: question, answer" in message
    assert "d.jsonl:1" in message


def test_sharegpt_tag_mismatch_lists_keys_found(tmp_path: Path) -> None:
    rows = [{"conversations": [{"role": "user", "content": "Code for asthma?"},
                               {"role": "assistant", "content": "J45.909"}]}]
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl", "formatting": "sharegpt"}}, {"d.jsonl": _jsonl(rows)})
    with pytest.raises(DataError, match=r"has no 'from' \(tags\.role_tag\); keys found: role, content"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


def test_optional_column_mapped_to_a_missing_name_fails(tmp_path: Path) -> None:
    rows = [{"instruction": "Code for essential hypertension?", "output": "I10"}]
    info = {"d": {"file_name": "raw/d.jsonl", "columns": {"prompt": "instruction", "system": "sys_prompt"}}}
    root = _write(tmp_path, info, {"d.jsonl": _jsonl(rows)})
    with pytest.raises(DataError, match=r"system -> 'sys_prompt' appear in no row .*found: instruction, output"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


def test_dataset_aligning_to_zero_rows_fails_with_top_reasons(tmp_path: Path) -> None:
    rows = [{"instruction": "Code for essential hypertension?", "input": "", "output": ""},
            {"instruction": "", "input": "", "output": "I10"},
            {"instruction": "Code for asthma?", "input": "", "output": ""}]
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl"}}, {"d.jsonl": _jsonl(rows)})
    with pytest.raises(DataError) as e:
        run_align(root, {"sft": ["d"]}, tmp_path / "align")
    message = str(e.value)
    assert "dataset 'd' aligned to zero rows (3 read" in message
    assert "empty_response (2, e.g. raw/d.jsonl:1: empty response)" in message
    assert "empty_prompt (1" in message


def test_unknown_format_lists_known_ones(tmp_path: Path) -> None:
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl", "formatting": "xml"}}, {"d.jsonl": ""})
    with pytest.raises(DataError, match=r"dataset 'd': field 'formatting'.*'alpaca', 'sharegpt', 'openai'"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


def test_dataset_in_a_group_of_the_wrong_kind_fails_before_reading(tmp_path: Path) -> None:
    info = {"d": {"file_name": "raw/d.jsonl", "formatting": "sharegpt"},
            "p": {"file_name": "raw/p.jsonl"}}
    root = _write(tmp_path, info, {"d.jsonl": "", "p.jsonl": ""})
    with pytest.raises(DataError, match=r"'d' \(sharegpt\) aligns to conversation records, but group 'cpt' needs text"):
        run_align(root, {"cpt": ["d"]}, tmp_path / "align")
    with pytest.raises(DataError, match=r"plain text only when `columns` maps just `prompt`"):
        run_align(root, {"cpt": ["p"]}, tmp_path / "align")
    with pytest.raises(DataError, match=r"unknown data group 'dpo'; known: cpt, cpt_eval"):
        run_align(root, {"dpo": ["d"]}, tmp_path / "align")


def test_lmflow_type_must_fit_the_group(tmp_path: Path) -> None:
    doc = {"type": "text_only", "instances": [{"text": "E11.9 Type 2 diabetes mellitus without complications"}]}
    root = _write(tmp_path, {"d": {"file_name": "raw/d.json", "formatting": "lmflow"}}, {"d.json": json.dumps(doc)})
    run_align(root, {"cpt": ["d"]}, tmp_path / "a")
    assert list(iter_records(tmp_path / "a" / "cpt.jsonl")) == [
        {"text": "E11.9 Type 2 diabetes mellitus without complications"}]
    with pytest.raises(DataError, match="an LMFlow text_only file aligns to text records, but its group needs conv"):
        run_align(root, {"sft": ["d"]}, tmp_path / "b")


def test_csv_row_with_extra_fields_is_a_parse_error(tmp_path: Path) -> None:
    text = "instruction,input,output\nCode for essential hypertension?,,I10\nCode for asthma?,,J45.909,extra\n"
    root = _write(tmp_path, {"d": {"file_name": "raw/d.csv"}}, {"d.csv": text})
    with pytest.raises(DataError, match=r"raw/d\.csv:3: 4 fields, header has 3"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


def test_iter_records_names_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DataError, match=r"sft\.jsonl:2: malformed JSON"):
        list(iter_records(path))


def test_unfetched_dataset_fails(tmp_path: Path) -> None:
    root = _write(tmp_path, {"d": {"hf_hub_url": "org/icd10"}}, {})
    with pytest.raises(DataError, match="no local file_name .* run the fetch stage first"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


# --- mixing the datasets of a group ----------------------------------------------------------


def _sources(*lengths: int):
    return [lambda n=n, name=name: iter(f"{name}{i}" for i in range(n)) for name, n in zip("abc", lengths)]


def test_interleave_round_robin_stops_after_a_full_round():
    mixed = [item for _, item in interleave(_sources(2, 3), probs=None, stop="first_exhausted", rng=random.Random(0))]
    assert mixed == ["a0", "b0", "a1", "b1"]
    mixed = [item for _, item in interleave(_sources(2, 3), probs=None, stop="all_exhausted", rng=random.Random(0))]
    assert mixed == ["a0", "b0", "a1", "b1", "a0", "b2"]  # the shorter one restarts until the longer one is done


def test_interleave_with_probabilities_is_seeded_and_follows_them():
    def draw(seed: int, stop: str) -> list[int]:
        return [i for i, _ in interleave(_sources(4000, 4000), probs=[0.8, 0.2], stop=stop, rng=random.Random(seed))]

    first = draw(1, "first_exhausted")
    assert first == draw(1, "first_exhausted") and first != draw(2, "first_exhausted")
    assert first.count(0) == 4000  # the likelier source runs out first, and that ends the stream
    assert 0.77 < first.count(0) / len(first) < 0.83
    over = draw(1, "all_exhausted")
    assert over.count(1) >= 4000 and over[-1] == 1  # ends when the rarer source has run out once
    assert 0.77 < over.count(0) / len(over) < 0.83


def test_interleave_reads_one_item_ahead_at_most():
    produced = [0, 0]

    def counting(k: int):
        def source():
            for i in range(1_000_000):
                produced[k] += 1
                yield i
        return source

    stream = interleave([counting(0), counting(1)], probs=[0.5, 0.5], stop="first_exhausted", rng=random.Random(0))
    taken = [next(stream) for _ in range(100)]
    stream.close()
    assert len(taken) == 100 and sum(produced) <= 100 + 2


def _mix_root(tmp_path: Path, sizes: dict[str, int]) -> Path:
    info = {name: {"file_name": f"raw/{name}.jsonl", "formatting": "alpaca"} for name in sizes}
    files = {f"{name}.jsonl": _jsonl([{"instruction": f"{name} question {i}?", "input": "", "output": f"{name} {i}"}
                                      for i in range(n)]) for name, n in sizes.items()}
    return _write(tmp_path, info, files)


def _sources_of(path: Path) -> list[str]:
    return [r["messages"][1]["content"].split()[0] for r in iter_records(path)]


def test_interleave_under_mixes_a_group_by_probability(tmp_path: Path) -> None:
    root = _mix_root(tmp_path, {"big": 3000, "small": 600})
    groups = {"sft": ["big", "small"], "sft_eval": ["big", "small"]}

    def run(out: str, **kwargs) -> tuple[StageResult, list[str]]:
        result = run_align(root, groups, tmp_path / out, mix_strategy="interleave_under",
                           interleave_probs=[0.75, 0.25], **kwargs)
        return result, _sources_of(tmp_path / out / "sft.jsonl")

    result, mixed = run("a")
    assert mixed == run("b")[1] and mixed != run("c", seed=7)[1]  # seeded
    assert 0.70 < mixed.count("big") / len(mixed) < 0.80
    assert mixed.count("small") <= 600 and (mixed.count("big") == 3000 or mixed.count("small") == 600)
    # Held-out groups are scored whole: always concatenated.
    assert _sources_of(tmp_path / "a" / "sft_eval.jsonl") == ["big"] * 3000 + ["small"] * 600
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["sft"]["big"]["rows_written"] == mixed.count("big")
    assert report["sft"]["small"]["rows_kept"] == 600
    assert result.metrics["rows_written_sft"] == len(mixed) and result.metrics["rows_kept_sft"] == 3600
    assert result.info["mix"] == {"sft": {"strategy": "interleave_under", "stop": "first_exhausted",
                                          "probs": [0.75, 0.25], "rows": len(mixed)}}
    assert "written" in format_report(report)
    assert not list((tmp_path / "a").glob(".*"))  # the part files are gone


def test_interleave_over_repeats_the_smaller_datasets(tmp_path: Path) -> None:
    root = _mix_root(tmp_path, {"big": 500, "small": 50, "tiny": 5})
    run_align(root, {"sft": ["big", "small", "tiny"]}, tmp_path / "out", mix_strategy="interleave_over")
    records = list(iter_records(tmp_path / "out" / "sft.jsonl"))
    answers = [r["messages"][1]["content"] for r in records]
    assert len(records) == 1500  # round-robin until the biggest has run out: 500 rounds of three
    assert set(answers) == {f"{name} {i}" for name, n in (("big", 500), ("small", 50), ("tiny", 5)) for i in range(n)}
    assert answers.count("tiny 0") == 100


def test_sampled_datasets_are_sampled_before_mixing(tmp_path: Path) -> None:
    root = _mix_root(tmp_path, {"big": 400, "small": 100})
    run_align(root, {"sft": ["big", "small"]}, tmp_path / "out", max_samples=50, mix_strategy="interleave_under")
    report = json.loads((tmp_path / "out" / "report.json").read_text())["sft"]
    assert report["big"]["rows_sampled_out"] == 350 and report["big"]["rows_written"] == 50
    assert _sources_of(tmp_path / "out" / "sft.jsonl") == ["big", "small"] * 50


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mix_strategy": "interleave_under", "interleave_probs": [0.5, 0.4]}, r"interleave_probs .* must sum to 1"),
    ({"mix_strategy": "interleave_under", "interleave_probs": [1.0]},
     r"interleave_probs has 1 entries but group 'sft' lists 2 datasets \(big, small\)"),
    ({"mix_strategy": "interleave_over", "interleave_probs": [1.0, 0.0]}, r"interleave_probs .* must be > 0"),
    ({"interleave_probs": [0.5, 0.5]}, r"interleave_probs needs mix_strategy interleave_under or interleave_over"),
    ({"mix_strategy": "shuffle"}, r"unknown mix_strategy 'shuffle'; known: concat, interleave_under"),
])
def test_bad_mixing_options_name_the_field(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = _mix_root(tmp_path, {"big": 4, "small": 2})
    with pytest.raises(DataError, match=message):
        run_align(root, {"sft": ["big", "small"]}, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_identity_placeholders_are_filled_from_the_config(tmp_path: Path) -> None:
    info = ROOT / "data" / "icd10" / "dataset_info.json"
    run_fetch(info, ["identity"], tmp_path / "fetch")
    fetched = json.loads((tmp_path / "fetch" / "dataset_info.json").read_text())["identity"]
    assert fetched["fill_placeholders"] is True  # kept on the fetched copy's entry
    run_align(tmp_path / "fetch", {"sft": ["identity"]}, tmp_path / "out", identity_name="CodeHelper",
              identity_author="Acme Health")
    text = (tmp_path / "out" / "sft.jsonl").read_text()
    assert "{{" not in text and "CodeHelper" in text and "Acme Health" in text
    raw = json.loads((ROOT / "data" / "icd10" / "identity.json").read_text())
    assert len(list(iter_records(tmp_path / "out" / "sft.jsonl"))) == len(raw)


def test_placeholders_stay_in_datasets_not_marked(tmp_path: Path) -> None:
    rows = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}."}]
    info = {"marked": {"file_name": "raw/d.jsonl", "fill_placeholders": True}, "plain": {"file_name": "raw/d.jsonl"}}
    root = _write(tmp_path, info, {"d.jsonl": _jsonl(rows)})
    run_align(root, {"sft": ["marked"], "sft_eval": ["plain"]}, tmp_path / "out", identity_name="Coder")
    assert next(iter_records(tmp_path / "out" / "sft.jsonl"))["messages"][1]["content"] == "I am Coder."
    assert next(iter_records(tmp_path / "out" / "sft_eval.jsonl"))["messages"][1]["content"] == "I am {{name}}."


def _mixed_rows(n: int) -> str:
    """JSONL alpaca rows with every outcome: kept, dropped (empty output), malformed, a placeholder."""
    lines = []
    for i in range(n):
        if i % 17 == 5:
            lines.append('{"instruction": "broken",}')
        elif i % 11 == 3:
            lines.append(json.dumps({"instruction": f"Describe code A{i:02d}", "input": "", "output": ""}))
        else:
            lines.append(json.dumps({"instruction": f"Who describes A{i:02d}?", "input": "", "output": f"{{{{name}}}} {i}"}))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("max_samples", [None, 40])
def test_worker_processes_align_to_the_same_bytes(tmp_path: Path, monkeypatch, max_samples) -> None:
    # Many small chunks over two spawned workers: same group file and report as in-process, with
    # parse failures under a budget, dropped rows, sampling and placeholders in the mix.
    monkeypatch.setattr("components.data.workers.CHUNK_BYTES", 256)
    info = {"d": {"file_name": "raw/d.jsonl", "fill_placeholders": True}}
    root = _write(tmp_path, info, {"d.jsonl": _mixed_rows(120)})
    options = {"bad_row_budget": 10, "identity_name": "Coder", "max_samples": max_samples}
    one = run_align(root, {"sft": ["d"]}, tmp_path / "one", num_proc=1, **options)
    two = run_align(root, {"sft": ["d"]}, tmp_path / "two", num_proc=2, **options)
    for name in ("sft.jsonl", "report.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert one.metrics == two.metrics
    assert (one.info["files_by_workers"], two.info["files_by_workers"], two.info["worker_processes"]) == (0, 1, 2)
    report = json.loads((tmp_path / "two" / "report.json").read_text())["sft"]["d"]
    assert report["dropped"]["malformed_json"]["count"] == 7 and report["dropped"]["empty_response"]["count"] > 0
    assert "Coder" in (tmp_path / "two" / "sft.jsonl").read_text()
    # The budget is spent in file order, so the error names the same line either way.
    with pytest.raises(DataError, match=r"raw/d\.jsonl:23: malformed JSON.*more than bad_row_budget=1"):
        run_align(root, {"sft": ["d"]}, tmp_path / "bad", num_proc=2, bad_row_budget=1)


@pytest.mark.parametrize(("module", "examples"), [("align", 1), ("mixing", 2), ("jsonl", 2)])
def test_docstring_examples_run(module: str, examples: int) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"components.data.{module}"))
    assert result.attempted >= examples and result.failed == 0


# --- messages name the user's own file ------------------------------------------------------


def _user_dataset(tmp_path: Path, entry: dict, files: dict[str, bytes]) -> Path:
    """A user's dataset_info.json and data files (not a fetch directory): what run_fetch reads."""
    src = tmp_path / "mydata"
    src.mkdir(parents=True)
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "dataset_info.json").write_text(json.dumps({"d": entry}))
    return src / "dataset_info.json"


def _fetch_and_align(tmp_path: Path, info: Path, group: str, **kwargs) -> StageResult:
    run_fetch(info, ["d"], tmp_path / "ws" / "fetch")
    return run_align(tmp_path / "ws" / "fetch", {group: ["d"]}, tmp_path / "ws" / "align", **kwargs)


def test_errors_name_the_users_file_and_line_not_the_fetched_copy(tmp_path: Path) -> None:
    rows = b'{"instruction": "Code for asthma?", "input": "", "output": "J45.909"}\n{"instruction": "x",}\n'
    info = _user_dataset(tmp_path, {"file_name": "sft/rows.jsonl"}, {"sft/rows.jsonl": rows})
    user_file = (tmp_path / "mydata" / "sft" / "rows.jsonl").resolve()
    with pytest.raises(DataError) as e:
        _fetch_and_align(tmp_path, info, "sft")
    assert str(e.value).startswith(f"{user_file}:2: malformed JSON")
    assert "/ws/" not in str(e.value)  # the fetched copy lives under the workspace: never named
    # A column mismatch and the report's examples name it too.
    info.write_text(json.dumps({"d": {"file_name": "sft/rows.jsonl", "columns": {"prompt": "question"}}}))
    with pytest.raises(DataError, match=f"does not match {user_file}:1: no column 'question'"):
        _fetch_and_align(tmp_path / "again", info, "sft")
    _fetch_and_align(tmp_path / "budget", _user_dataset(tmp_path / "budget", {"file_name": "sft/rows.jsonl"},
                                                        {"sft/rows.jsonl": rows}), "sft", bad_row_budget=1)
    report = json.loads((tmp_path / "budget" / "ws" / "align" / "report.json").read_text())["sft"]["d"]
    at = report["dropped"]["malformed_json"]["examples"][0]["at"]
    assert at == f"{(tmp_path / 'budget' / 'mydata' / 'sft' / 'rows.jsonl').resolve()}:2"


def test_errors_name_the_url_and_the_file_inside_a_directory(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files = {"/icd/rows.jsonl": b'{"text": "I10"}\n{"text": }\n'}
    info = _user_dataset(tmp_path, {"url": f"{base}/icd/rows.jsonl", "formatting": "text"}, {})
    with pytest.raises(DataError, match=rf"^{base}/icd/rows\.jsonl:2: malformed JSON"):
        _fetch_and_align(tmp_path, info, "cpt")
    notes = {"notes/a.txt": b"E11.9 Type 2 diabetes\n", "notes/b.txt": b"I10 Essential\nK21.9 GERD \xe9sophagitis\n"}
    info = _user_dataset(tmp_path / "dir", {"file_name": "notes", "formatting": "text"}, notes)
    with pytest.raises(DataError) as e:
        _fetch_and_align(tmp_path / "dir", info, "cpt")
    assert str(e.value).startswith(f"{(tmp_path / 'dir' / 'mydata' / 'notes').resolve()}/b.txt:2: not UTF-8")


# --- text that is not UTF-8 -----------------------------------------------------------------


LATIN1_ROWS = ('{"text": "E11.9 Type 2 diabetes"}\n'.encode() + '{"text": "K21.9 reflux, \xe9sophagite"}\n'.encode("latin-1")
               + '{"text": "I10 Essential"}\n'.encode())


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_jsonl_line_that_is_not_utf8_is_a_bad_row(tmp_path: Path, num_proc: int) -> None:
    root = _write(tmp_path, {"d": {"file_name": "raw/d.jsonl", "formatting": "text"}}, {"d.jsonl": ""})
    (root / "raw" / "d.jsonl").write_bytes(LATIN1_ROWS)
    with pytest.raises(DataError) as e:
        run_align(root, {"cpt": ["d"]}, tmp_path / "a", num_proc=num_proc)
    message = str(e.value)
    assert message.startswith("raw/d.jsonl:2: not UTF-8 (byte 0xe9 at byte 25 of the line)")
    assert "iconv -f latin1 -t utf-8" in message and "bad_row_budget" in message
    assert len(message) < 300 and "\\x" not in message  # short, and no bytes dumped
    run_align(root, {"cpt": ["d"]}, tmp_path / "b", bad_row_budget=1, num_proc=num_proc)
    assert [r["text"] for r in iter_records(tmp_path / "b" / "cpt.jsonl")] == ["E11.9 Type 2 diabetes", "I10 Essential"]
    dropped = json.loads((tmp_path / "b" / "report.json").read_text())["cpt"]["d"]["dropped"]
    assert dropped["not_utf8"]["count"] == 1 and dropped["not_utf8"]["examples"][0]["at"] == "raw/d.jsonl:2"


def test_a_binary_json_file_fails_naming_it_briefly(tmp_path: Path) -> None:
    root = _write(tmp_path, {"d": {"file_name": "raw/d.json"}}, {"d.json": ""})
    (root / "raw" / "d.json").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    with pytest.raises(DataError) as e:
        run_align(root, {"sft": ["d"]}, tmp_path / "align")
    message = str(e.value)
    assert message.startswith("raw/d.json:1: not UTF-8 (byte 0x89 at byte 1 of the line)")
    assert len(message) < 300


def test_a_csv_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    root = _write(tmp_path, {"d": {"file_name": "raw/d.csv"}}, {"d.csv": ""})
    text = "instruction,input,output\nCode for asthma?,,J45.909\nCode for \xe9czema?,,L30.9\n"
    (root / "raw" / "d.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"^raw/d\.csv:3: not UTF-8 .*iconv"):
        run_align(root, {"sft": ["d"]}, tmp_path / "align")


def _tasks_root(tmp_path: Path, sizes: dict[str, int]) -> Path:
    info = {"qa": {"file_name": "raw/qa.jsonl", "formatting": "alpaca",
                   "columns": {"prompt": "instruction", "response": "output", "task": "task"}}}
    rows = [{"instruction": f"{task} question {i}?", "output": f"{task} {i}", "task": task}
            for task, n in sizes.items() for i in range(n)]
    return _write(tmp_path, info, {"qa.jsonl": _jsonl(rows)})


def test_sft_task_weights_repeat_sample_and_drop_tasks(tmp_path: Path) -> None:
    root = _tasks_root(tmp_path, {"chapter": 40, "billable": 40, "describe": 40, "code": 40})
    weights = {"chapter": 2.5, "billable": 0.5, "describe": 0}
    result = run_align(root, {"sft": ["qa"], "sft_eval": ["qa"]}, tmp_path / "a", sft_task_weights=weights)
    answers = [r["messages"][1]["content"] for r in iter_records(tmp_path / "a" / "sft.jsonl")]
    tasks = [a.split()[0] for a in answers]
    assert {t: tasks.count(t) for t in set(tasks)} == {"chapter": 100, "billable": 20, "code": 40}
    assert all(answers.count(f"chapter {i}") in (2, 3) for i in range(40))  # every row twice, a seeded half thrice
    assert len(set(a for a in answers if a.startswith("billable"))) == 20  # half the rows, none repeated
    assert tasks[:40] != ["chapter"] * 40  # shuffled, not task after task
    assert result.metrics["rows_written_sft"] == 160
    assert result.info["mix"]["sft"]["task_weights"]["tasks"]["describe"] == {"rows_in": 40, "rows_out": 0}
    # Held-out rows are never reweighted; the same seed gives the same file.
    assert len(list(iter_records(tmp_path / "a" / "sft_eval.jsonl"))) == 160
    run_align(root, {"sft": ["qa"]}, tmp_path / "b", sft_task_weights=weights)
    assert (tmp_path / "a" / "sft.jsonl").read_bytes() == (tmp_path / "b" / "sft.jsonl").read_bytes()
    assert not list((tmp_path / "a").glob(".*"))


def test_sft_task_weights_name_a_missing_task(tmp_path: Path) -> None:
    root = _tasks_root(tmp_path, {"chapter": 5, "billable": 5})
    with pytest.raises(DataError, match=r"sft_task_weights names 'chaptr'.*no row of data.sft \(qa\).*tasks present: billable, chapter"):
        run_align(root, {"sft": ["qa"]}, tmp_path / "out", sft_task_weights={"chaptr": 2})
    with pytest.raises(DataError, match="leaves no row"):
        run_align(root, {"sft": ["qa"]}, tmp_path / "out2", sft_task_weights={"chapter": 0, "billable": 0})


def test_sft_phases_follow_each_other_in_the_file(tmp_path: Path) -> None:
    # A curriculum: the weighted mix first, then only the tasks each later phase names, in that order.
    root = _tasks_root(tmp_path, {"chapter": 30, "billable": 20, "code": 10})
    result = run_align(root, {"sft": ["qa"]}, tmp_path / "a", sft_task_weights={"code": 0},
                       sft_phases=[{"billable": 1.5}, {"chapter": 1, "billable": 0.5}])
    tasks = [r["messages"][1]["content"].split()[0] for r in iter_records(tmp_path / "a" / "sft.jsonl")]
    assert len(tasks) == 50 + 30 + 40
    assert sorted(tasks[:50]) == ["billable"] * 20 + ["chapter"] * 30 and tasks[:50] != sorted(tasks[:50])
    assert tasks[50:80] == ["billable"] * 30
    assert sorted(tasks[80:]) == ["billable"] * 10 + ["chapter"] * 30 and tasks[80:] != sorted(tasks[80:])
    mix = result.info["mix"]["sft"]
    assert mix["phases"][0] == {"weights": {"billable": 1.5}, "tasks": {"billable": {"rows_in": 20, "rows_out": 30}}}
    assert mix["phases"][1]["tasks"]["chapter"] == {"rows_in": 30, "rows_out": 30}
    assert result.metrics["rows_written_sft"] == 120
    with pytest.raises(DataError, match=r"^data\.sft_phases\[1\] names 'billabel'"):
        run_align(root, {"sft": ["qa"]}, tmp_path / "b", sft_phases=[{"code": 1}, {"billabel": 1}])
    with pytest.raises(DataError, match=r"^data\.sft_phases\[0\] \{'code': 0\.0\} leaves no row"):
        run_align(root, {"sft": ["qa"]}, tmp_path / "c", sft_phases=[{"code": 0.0}])
