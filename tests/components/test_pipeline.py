"""The stage table is the one description of the graph: it is consistent, and everything reads it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from components.config import load_config
from components.pipeline import STAGE_KINDS, STAGE_TABLE, STAGES_BY_NAME, KeyFacts, StageInputs, planned_nodes

FACTS = KeyFacts(precision="fp32", tokenizer_digest="tok", model_digest="model")
DEMO = Path(__file__).resolve().parents[2] / "configs/demo-cpu.yaml"


def test_every_entry_point_exists_with_the_stage_signature():
    for spec in STAGE_TABLE:
        fn = spec.function()
        assert list(inspect.signature(fn).parameters) == ["cfg", "inputs", "out_dir"], spec.entry


def test_upstream_nodes_come_earlier_in_the_table():
    seen: set[str] = set()
    for spec in STAGE_TABLE:
        assert set(spec.upstream) <= seen, spec.name
        assert spec.keyed_upstream is None or set(spec.keyed_upstream) <= set(spec.upstream)
        seen.add(spec.name)
    assert len(seen) == len(STAGE_TABLE)


def test_every_key_slice_is_json_and_a_model_stage_is_keyed_on_the_base_model():
    cfg = load_config(DEMO)  # names datasets for every group (the built-in defaults name none)
    keyed_by: dict[str, set[str]] = {}  # node -> every node whose digest reaches its key
    for node in planned_nodes(cfg):
        assert isinstance(node.spec.keyed_on(cfg, FACTS), dict)
        keyed_by[node.name] = set(node.keyed_upstream).union(*(keyed_by[u] for u in node.keyed_upstream))
        if "prepare" in node.upstream and node.name != "tokenize":
            assert "prepare" in keyed_by[node.name], node.name  # the weights' content reaches the key
    tokenize = STAGES_BY_NAME["tokenize"].keyed_on(cfg, FACTS)
    assert tokenize["tokenizer"] == "tok"  # the tokenizer's own digest, not the weights'


def test_disabled_stages_drop_out_of_the_plan_and_of_their_readers_inputs():
    cfg = load_config(None, ["cpt.enabled=false", "quantize.enabled=false"])
    nodes = {n.name: n for n in planned_nodes(cfg)}
    assert "cpt" not in nodes and "evaluate-cpt" not in nodes and "register" not in nodes
    assert nodes["sft"].upstream == ("prepare", "tokenize")
    assert STAGE_KINDS[0] == "prepare" and STAGE_KINDS[-1] == "promote"


def test_adapter_stack_is_the_longest_among_the_inputs(tmp_path):
    upstream = {
        "prepare": {"dir": str(tmp_path), "info": {"source": "/models/base", "revision": None}},
        "cpt": {"dir": "c", "info": {"adapter_stack": ["/a/cpt/adapter"]}},
        "sft": {"dir": "s", "info": {"adapter_stack": ["/a/cpt/adapter", "/a/sft/adapter"]}},
    }
    inputs = StageInputs(node="evaluate-adapted", kind="evaluate", upstream=upstream)
    assert [p.name for p in inputs.adapter_stack()] == ["adapter", "adapter"]
    assert str(inputs.adapter_stack()[-1]) == "/a/sft/adapter"
    assert inputs.base_model.source == "/models/base"
    with pytest.raises(KeyError, match="has no input 'quantize'"):
        inputs.dir("quantize")


def test_flow_parameters_offer_exactly_the_stage_kinds():
    from prefect.utilities.callables import parameter_schema

    from flows.domain_adaptation import domain_adaptation

    schema = parameter_schema(domain_adaptation).model_dump()
    text = str(schema)
    for kind in STAGE_KINDS:
        assert f"'{kind}'" in text


def test_a_stage_keyed_on_some_files_of_an_input_may_open_only_those(tmp_path):
    inputs = StageInputs(node="sft", kind="sft", upstream={"tokenize": {"dir": str(tmp_path)}, "prepare": {"dir": "p"}},
                         reads=STAGES_BY_NAME["sft"].reads)
    assert inputs.file("tokenize", "sft.parquet") == tmp_path / "sft.parquet"
    with pytest.raises(KeyError, match=r"sft_eval.parquet of tokenize.*add the file to the row's `reads`"):
        inputs.file("tokenize", "sft_eval.parquet")
    with pytest.raises(KeyError, match="files not named"):
        inputs.dir("tokenize")  # a bare directory would let the stage read anything in it
    assert str(inputs.dir("prepare")) == "p"  # keyed on the whole node: any file


def test_the_key_holds_the_digest_of_the_files_a_stage_reads_and_of_no_other():
    sft = STAGES_BY_NAME["sft"]
    tokenized = {"stage": "tokenize", "digest": "whole-1", "cache_key": "k1",
                 "files": {"sft.parquet": {"sha256": "a"}, "sft_eval.parquet": {"sha256": "b"}}}
    digest = sft.upstream_digest("tokenize", tokenized)
    new_heldout = {**tokenized, "digest": "whole-2", "cache_key": "k2",
                   "files": {**tokenized["files"], "sft_eval.parquet": {"sha256": "c"}}}
    assert sft.upstream_digest("tokenize", new_heldout) == digest
    new_rows = {**tokenized, "files": {**tokenized["files"], "sft.parquet": {"sha256": "d"}}}
    assert sft.upstream_digest("tokenize", new_rows) != digest
    assert sft.upstream_digest("prepare", tokenized) == "whole-1"  # not in `reads`: the whole manifest


def test_tokenize_reads_every_group_it_tokenizes_and_no_prompts():
    from components.data.records import GROUP_KINDS, UNTOKENIZED_GROUPS

    reads = STAGES_BY_NAME["tokenize"].reads["align"]
    assert set(reads) == {f"{g}.jsonl" for g in GROUP_KINDS} - {f"{g}.jsonl" for g in UNTOKENIZED_GROUPS}
