"""The data stages' pipeline entry points: fetch, align and tokenize called as the flow calls them."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from components.data.align import align_stage, run_align
from components.data.fetch import fetch_stage
from components.data.records import GROUP_KINDS
from components.data.tokenize import run_tokenize, tokenize_stage
from components.pipeline import StageInputs
from tests.conftest import tiny_pipeline_config


def inputs(node: str, upstream: dict[str, dict]) -> StageInputs:
    return StageInputs(node=node, kind=node, upstream=upstream)


def test_fetch_align_tokenize_stages_read_the_config_and_their_inputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{
        "data.sft": "[icd10_instructions, identity]", "data.max_samples": 12, "data.seed": 7,
        "data.mix_strategy": "interleave_over", "data.identity_name": "Coder", "tokenize.cutoff_len": 128,
        "data.sft_task_weights": "{}", "data.rule_baselines": "{}"})  # run_align by hand below applies neither
    fetched = fetch_stage(cfg, inputs("fetch", {}), tmp_path / "fetch")
    names = sorted({name for group in GROUP_KINDS for name in getattr(cfg.data, group)})
    assert fetched.info["datasets"] == names and (tmp_path / "fetch" / "provenance.json").is_file()

    aligned = align_stage(cfg, inputs("align", {"fetch": {"dir": str(tmp_path / "fetch")}}), tmp_path / "align")
    groups = {g: getattr(cfg.data, g) for g in GROUP_KINDS if getattr(cfg.data, g)}
    by_hand = run_align(tmp_path / "fetch", groups, tmp_path / "by_hand", max_samples=12, seed=7,
                        mix_strategy="interleave_over", identity_name="Coder")
    assert aligned.files == by_hand.files and aligned.metrics == by_hand.metrics
    assert aligned.info["mix"]["sft"]["strategy"] == "interleave_over"
    assert "Coder" in (tmp_path / "align" / "sft.jsonl").read_text()
    for name in aligned.files:
        assert (tmp_path / "align" / name).read_bytes() == (tmp_path / "by_hand" / name).read_bytes()

    upstream = {"prepare": {"dir": str(tiny_model_dir), "info": {"source": str(tiny_model_dir)}},
                "align": {"dir": str(tmp_path / "align")}}
    tokenized = tokenize_stage(cfg, inputs("tokenize", upstream), tmp_path / "tokenize")
    assert set(tokenized.info["stats"]) == set(groups)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_tokenize(tmp_path / "align", tokenizer, cfg.tokenize, tmp_path / "tok_by_hand",
                 groups={g: GROUP_KINDS[g] for g in groups})
    for name in ("cpt.parquet", "sft.parquet"):
        assert pq.read_table(tmp_path / "tokenize" / name).equals(pq.read_table(tmp_path / "tok_by_hand" / name))
