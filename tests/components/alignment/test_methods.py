"""Alignment methods on a tiny random model: each raises what it optimises.

RAFT and GRPO get a rule reward the random model can learn in a few steps (short answers: stopping
early is one token to learn); DPO must widen the chosen-minus-rejected margin; ORPO, SimPO and KTO must train and save.
"""

from __future__ import annotations

import random

import pytest
import torch

from components.alignment.data import unpaired
from components.alignment.raft import run_raft
from components.alignment.sampling import sample, stop_ids
from components.alignment.trl_methods import train_grpo, train_preference
from components.alignment.trl_support import lora_config
from components.config import AlignmentConfig
from components.data.chat_render import render_prompt
from components.models.loading import load_model, load_tokenizer, select_hardware

CPU = select_hardware("cpu", "fp32")
QUESTIONS = ["Which ICD-10-CM chapter contains code E11.9?", "Is ICD-10-CM code J45 billable?",
             "What does ICD-10-CM code I10 describe?", "What is the ICD-10-CM code for: Cholera?"]


def short_reward(prompts, completions, **_):
    return [max(0.0, 1.0 - len(c) / 40) if c.strip() else 0.0 for c in completions]


def _prompts(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]
        rows.append({"prompt": render_prompt(tokenizer, "auto", messages, None), "messages": messages,
                     "reference": "0", "task": "toy"})
    return rows


def _mean_reward(model, tokenizer, prompts, eos) -> float:
    groups, _ = sample(model, tokenizer, [p["prompt"] for p in prompts], k=4, temperature=1.0, top_p=1.0,
                       max_new_tokens=8, eos=eos, seed=123)
    flat = [c for g in groups for c in g]
    return sum(short_reward(None, flat)) / len(flat)


@pytest.fixture
def tiny(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return load_model(str(tiny_model_dir), CPU), tokenizer


def test_seeded_sampling_repeats_and_leaves_the_callers_rng_alone(tiny):
    model, tokenizer = tiny
    prompts = [p["prompt"] for p in _prompts(tokenizer, 3)]
    eos = stop_ids(tokenizer, "auto")

    def draw():
        return sample(model, tokenizer, prompts, k=3, temperature=1.0, top_p=1.0, max_new_tokens=6, eos=eos, seed=7)

    torch.manual_seed(0)
    expected_next = torch.rand(4)
    torch.manual_seed(0)
    first = draw()
    assert torch.equal(torch.rand(4), expected_next)  # the caller's random stream goes on as if nothing ran
    assert draw() == first


def test_raft_raises_a_rule_reward_and_resumes(tiny, tmp_path):
    from peft import get_peft_model

    import torch

    torch.manual_seed(0)
    model, tokenizer = tiny
    cfg = AlignmentConfig(method="raft", learning_rate=1e-2, batch_size=8, num_generations=4, max_new_tokens=8,
                          lr_scheduler="constant", warmup_ratio=0.0,
                          raft={"iterations": 3, "prompts_per_iteration": 8, "steps_per_iteration": 8})
    cfg.lora.r = 8
    policy = get_peft_model(model, lora_config(cfg.lora, "CAUSAL_LM"))
    eos = stop_ids(tokenizer, "auto")
    prompts = _prompts(tokenizer, 16)
    before = _mean_reward(policy, tokenizer, prompts, eos)
    metrics, history = run_raft(policy, tokenizer, prompts, short_reward, cfg, cutoff_len=64, eos=eos, out_dir=tmp_path)
    after = _mean_reward(policy, tokenizer, prompts, eos)
    # Best-of-4 on a random model is a weak signal: a few points over the run. (Strictly rising every
    # iteration held alone but not after other tests had moved the global RNG: too tight a claim.)
    assert after > before + 0.03, (before, after, history)
    schedule = torch.load(tmp_path / "checkpoints" / "iteration-2" / "scheduler.pt", weights_only=True)
    assert schedule["last_epoch"] == sum(h["train_steps"] for h in history) == 24
    assert history[0]["reward_mean"] < history[-1]["reward_mean"], history
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert all(h["kept"] > 0 and h["kept_reward_mean"] >= h["reward_mean"] for h in history)
    assert (tmp_path / "raft" / "iteration-2.jsonl").is_file()
    # A rerun finds every iteration checkpointed and trains only the new one, here on contested prompts
    # alone: at most one kept answer per prompt whose samples disagreed.
    cfg_more = cfg.model_copy(update={"raft": cfg.raft.model_copy(update={"iterations": 4, "contested_only": True})})
    _, history2 = run_raft(policy, tokenizer, prompts, short_reward, cfg_more, cutoff_len=64, eos=eos, out_dir=tmp_path)
    assert [h["iteration"] for h in history2] == [0, 1, 2, 3]
    assert history2[:3] == history
    assert 0 < history2[3]["kept"] <= history2[3]["contested_prompts"] <= history2[3]["prompts"], history2[3]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grpo_trains_on_the_reward_interface_with_a_kl_anchor(tiny, tmp_path):
    """GRPO through TRL takes our reward function as is and reports reward and KL. (That it raises the
    verifiable reward is shown on the demo model, see bench/RESULTS.md: a random 2-layer model learns
    too little in the few steps a unit test can afford.)"""
    model, tokenizer = tiny
    seen: list[dict] = []

    def recording_reward(prompts, completions, **columns):
        seen.append({"n": len(completions), "reference": columns.get("reference")})
        return short_reward(prompts, completions)

    cfg = AlignmentConfig(method="grpo", learning_rate=2e-2, batch_size=2, num_generations=4, max_new_tokens=6,
                          max_steps=3, logging_steps=1, save_steps=2, warmup_ratio=0.0, beta=0.05)
    policy, history, metrics = train_grpo(model, tokenizer, _prompts(tokenizer, 8), recording_reward, cfg, CPU, tmp_path)
    assert seen and all(call["n"] == 8 and call["reference"] == ["0"] * 8 for call in seen)
    assert "kl_last" in metrics and "reward_last" in metrics  # beta > 0: the KL to the SFT model is reported
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # the adapter moved off its zero init
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "lmforge-complete").is_file()


def _pairs(tokenizer, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = render_prompt(tokenizer, "auto", [{"role": "user", "content": rng.choice(QUESTIONS)}], None)
        rows.append({"prompt": prompt, "chosen": "Essential (primary) hypertension<|im_end|>",
                     "rejected": "0123456789<|im_end|>"})
    return rows


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dpo_widens_the_margin(tiny, tmp_path):
    model, tokenizer = tiny
    cfg = AlignmentConfig(method="dpo", learning_rate=5e-3, batch_size=4, max_steps=10, logging_steps=1,
                          save_steps=100, warmup_ratio=0.0, max_length=64)
    policy, history, metrics = train_preference("dpo", model, tokenizer, _pairs(tokenizer, 16), cfg, CPU, tmp_path)
    assert metrics["rewards_margins_last"] > metrics["rewards_margins_first"]
    assert metrics["rewards_margins_last"] > 0


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_other_preference_methods_train_and_save(tiny, tmp_path, method):
    model, tokenizer = tiny
    rows = _pairs(tokenizer, 8)
    if method == "kto":
        rows = unpaired(rows)
    cfg = AlignmentConfig(method=method, learning_rate=5e-3, batch_size=4, max_steps=3, logging_steps=1,
                          save_steps=100, warmup_ratio=0.0, max_length=64)
    policy, history, metrics = train_preference(method, model, tokenizer, rows, cfg, CPU, tmp_path)
    policy.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert metrics["train_loss_first"] == metrics["train_loss_first"]  # a real number, not NaN
