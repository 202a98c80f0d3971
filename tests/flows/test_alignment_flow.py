"""Alignment in the flow, on the tiny model: the reward stage and one alignment method run after SFT,
the aligned model is evaluated beside base and SFT, and quantize/register take the aligned stack.
Switching the method (raft -> ppo) reruns exactly the alignment stage and what reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e

REWARD = {"reward.enabled": "true", "reward.max_steps": 3, "reward.batch_size": 4, "reward.logging_steps": 1,
          "reward.max_length": 96}
# Each method takes only the settings it reads (AlignmentConfig refuses the others).
SAMPLING = {"alignment.max_prompts": 8, "alignment.num_generations": 2, "alignment.max_new_tokens": 4}
TRAINER = {"alignment.max_steps": 2, "alignment.logging_steps": 1}
ALIGN = {**REWARD, **SAMPLING, "alignment.batch_size": 2, "alignment.raft.iterations": 1,
         "alignment.raft.prompts_per_iteration": 4, "alignment.raft.steps_per_iteration": 2,
         "alignment.reward.model_weight": 0.5, "evaluate.sample_k": 2}


def _switched(cfg, **alignment):
    """`cfg` with these alignment fields, validated as a --set would be (model_copy skips the validators)."""
    from components.config import PipelineConfig

    data = cfg.model_dump()
    data["alignment"].update(alignment)
    return PipelineConfig.model_validate(data)


def _status(summary):
    return {row["stage"]: row["cached"] for row in summary["timeline"]}


def test_raft_then_ppo_in_the_flow(tiny_model_dir, tmp_path, prefect_harness):
    from flows.domain_adaptation import domain_adaptation

    # Sampling prompts of their own (data.prompts): billable questions the SFT rows do not ask.
    # No reward floor: the random tiny model's answers all score below the demo's 0 (the rule gives them
    # nothing and the 3-step reward model scores them slightly negative); RAFT keeps the best of each prompt.
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{"alignment.method": "raft", **ALIGN,
                                                                   "data.prompts": "[icd10_billable]",
                                                                   "alignment.raft.reward_threshold": "null"})
    summary = domain_adaptation(config=cfg)
    status = _status(summary)
    assert ["sft", "reward", "alignment", "evaluate-base"] == [s for s in status if s in
                                                               ("sft", "reward", "alignment", "evaluate-base")]
    assert summary["columns"][-1] == "aligned"
    # Every column scores the same held-out answers with the rule; the SFT and aligned columns, which the
    # reward-hacking check compares, with the reward model too (it never saw the base model's answers).
    for metric in ("verifiable_reward", "msttr_50", "response_words_mean"):
        row = summary["comparison"][metric]
        assert row["base"] is not None and row["aligned"] is not None, metric
    rm = summary["comparison"]["reward_model_mean"]
    assert rm["base"] is None and rm["adapted"] is not None and rm["aligned"] is not None
    reward = json.loads((Path(summary["stages"]["reward"]) / "reward_report.json").read_text())
    assert reward["judged_on"] == "held-out" and 0 <= reward["quality"]["accuracy"] <= 1
    quantize = json.loads((Path(summary["stages"]["quantize"]) / "manifest.json").read_text())
    aligned_adapter = str(Path(summary["stages"]["alignment"]).resolve() / "adapter")
    assert quantize["info"]["merged_adapters"][-1] == aligned_adapter
    assert summary["alignment"]["method"] == "raft"
    report = json.loads((Path(summary["stages"]["alignment"]) / "alignment_report.json").read_text())
    assert report["prompts_from"] == "data.prompts" and report["prompts"] > 0
    kept = [json.loads(line) for line in (Path(summary["stages"]["alignment"]) / "raft" / "iteration-0.jsonl").open()]
    assert kept and all(row["prompt"].endswith("billable?") and row["reference"] in ("Yes", "No") for row in kept)
    assert not (Path(summary["stages"]["tokenize"]) / "prompts.parquet").exists()  # rendered when sampled
    # KL to the SFT model on the aligned model's own held-out answers, and the paired change over SFT.
    assert summary["alignment"]["kl_to_sft"] >= 0 and summary["comparison"]["kl_to_sft"]["adapted"] is None
    change = summary["alignment"]["verifiable_reward_change"]
    assert change["n"] > 0 and change["after"] - change["before"] == pytest.approx(change["change"]["value"])
    assert change["change"]["ci_low"] <= change["change"]["value"] <= change["change"]["ci_high"]
    assert summary["metrics"]["aligned_verifiable_reward_change"] == change["change"]["value"]
    sampled = summary["alignment"]["sampled_verifiable_reward_change"]
    assert sampled["n"] == change["n"] and 0 <= sampled["before"] <= 1
    assert summary["comparison"]["sampled_verifiable_reward"]["base"] is not None
    # samples.jsonl, written once, carries every per-answer measure beside the greedy answer.
    saved = [json.loads(line) for line in (Path(summary["stages"]["evaluate-aligned"]) / "samples.jsonl").open()]
    assert saved and all({"prediction", "sampled", "sampled_verifiable_reward", "verifiable_reward",
                          "reward_model_score"} <= set(s) for s in saved)
    # Every training stage's curves are drawn, RAFT's per iteration among them, beside the per-task bars.
    drawn = {Path(p).name for p in summary["plots"]}
    assert {"cpt-training.png", "sft-training.png", "reward-training.png", "alignment-training.png",
            "per-task-exact-match.png"} <= drawn

    # PPO on the same SFT model, with the reward stage's adapter and score head on its one shared model.
    ppo = _switched(cfg, method="ppo", max_steps=2, num_generations=4)  # PPO samples one answer per prompt
    second = domain_adaptation(config=ppo)
    assert second["alignment"]["method"] == "ppo"
    again = _status(second)
    rerun = {s for s, cached in again.items() if not cached}
    assert rerun == {"alignment", "evaluate-aligned", "quantize", "register"} | ({"promote"} & set(again))
    assert again["reward"] and again["sft"] and again["evaluate-base"]
    assert "alignment-training.png" in {Path(p).name for p in second["plots"]}  # PPO's steps


def test_every_trl_method_runs_in_the_flow_on_the_same_sft_model(tiny_model_dir, tmp_path, prefect_harness):
    """`--set alignment.method=M` for each TRL-backed method: each run reuses everything up to SFT and
    reruns exactly the alignment stage and what reads it, and quantize merges that method's adapter."""
    from flows.domain_adaptation import domain_adaptation

    # GRPO on the verifiable rule alone: no reward stage.
    # The pair methods sample nothing: the demo's sampling settings go back to their defaults, and come back for GRPO.
    settings = {**TRAINER, "alignment.batch_size": 2, "alignment.max_length": 96, "alignment.reward.model_weight": 0,
                "evaluate.sample_k": 2, "alignment.temperature": 1.0, "alignment.max_new_tokens": 24}
    grpo = {"max_length": 256, "temperature": 0.7, **{k.split(".")[1]: v for k, v in SAMPLING.items()}}
    # A long system prompt, so that some prompts leave no room for an answer (the report counts them).
    settings["tokenize.system_prompt"] = "You are a medical coding assistant. Answer with the ICD-10-CM fact asked for."
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{"alignment.method": "dpo", **settings})
    for method in ("dpo", "kto", "orpo", "simpo", "grpo"):
        run = _switched(cfg, method=method, **(grpo if method == "grpo" else {}))
        summary = domain_adaptation(config=run)
        status = _status(summary)
        assert summary["alignment"]["method"] == method
        assert "reward" not in status  # the rule reward needs no reward model
        if method != "dpo":
            rerun = {s for s, cached in status.items() if not cached}
            assert rerun == {"alignment", "evaluate-aligned", "quantize", "register"} | ({"promote"} & set(status))
        quantize = json.loads((Path(summary["stages"]["quantize"]) / "manifest.json").read_text())
        assert quantize["info"]["merged_adapters"][-1] == str(Path(summary["stages"]["alignment"]).resolve() / "adapter")
        assert summary["comparison"]["verifiable_reward"]["aligned"] is not None
        if method != "grpo":  # the tiny tokenizer's prompts run 80-197 tokens: the longer ones leave no answer room
            report = json.loads((Path(summary["stages"]["alignment"]) / "alignment_report.json").read_text())
            assert report["data"]["prompt_too_long"] > 0, report["data"]
