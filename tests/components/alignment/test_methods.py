"""Alignment methods on tiny random models: each raises what it optimises.

RAFT gets a rule reward the random model can learn in a few steps (short answers: stopping early is one
token to learn). GRPO runs on the small-vocabulary model (tests/tiny_model.py), whose next-token
distribution an adapter can move, with a reward for a set of its words. DPO must widen TRL's
chosen-minus-rejected margin; KTO, ORPO and SimPO must raise the chosen answer's log-probability over the
rejected one's, measured here on the model itself.
"""

from __future__ import annotations

import random

import pytest
import torch

from components.alignment.data import unpaired
from components.alignment.raft import run_raft
from components.alignment.sampling import sample
from components.models.generation import stop_ids
from components.alignment.trl_methods import train_grpo, train_preference
from components.training.methods import lora_config
from components.config import AlignmentConfig
from components.data.chat_render import render_prompt
from components.models.loading import load_model, load_tokenizer, select_hardware

CPU = select_hardware("cpu", "fp32")
QUESTIONS = ["Which ICD-10-CM chapter contains code E11.9?", "Is ICD-10-CM code J45 billable?",
             "What does ICD-10-CM code I10 describe?", "What is the ICD-10-CM code for: Cholera?"]


def _prompts(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]
        rows.append({"prompt": render_prompt(tokenizer, "auto", messages, None), "messages": messages,
                     "reference": "0", "task": "toy"})
    return rows


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


def _word_prompts(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        text = " ".join(f"w{(i * 7 + j) % 45}" for j in range(4))
        rows.append({"prompt": text, "messages": [{"role": "user", "content": text}], "reference": "0", "task": "toy"})
    return rows


def test_raft_raises_a_rule_reward_and_resumes(small_model_dir, tmp_path):
    from peft import get_peft_model

    # The 45-word model: sampling from its whole vocabulary, best-of-4 moves a word-count reward within a few
    # iterations (on the 384-token random model, samples from the full softmax are noise RAFT cannot sharpen).
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(small_model_dir))
    model = load_model(str(small_model_dir), CPU)
    cfg = AlignmentConfig(method="raft", learning_rate=2e-2, batch_size=8, num_generations=4, max_new_tokens=6,
                          lr_scheduler="constant", warmup_ratio=0.0,
                          raft={"iterations": 3, "prompts_per_iteration": 8, "steps_per_iteration": 8})
    cfg.lora.r = 8
    policy = get_peft_model(model, lora_config(cfg.lora, "CAUSAL_LM"))
    eos = [tokenizer.eos_token_id]
    prompts = _word_prompts(16)

    def mean_reward() -> float:  # 64 seeded samples, the same before and after
        groups, _ = sample(policy, tokenizer, [p["prompt"] for p in prompts], k=4, temperature=1.0, top_p=1.0,
                           max_new_tokens=6, eos=eos, seed=123)
        flat = [c for g in groups for c in g]
        return sum(digit_word_reward(None, flat)) / len(flat)

    before = mean_reward()
    metrics, history = run_raft(policy, tokenizer, prompts, digit_word_reward, cfg, cutoff_len=64, eos=eos,
                                out_dir=tmp_path)
    after = mean_reward()
    assert after > before + 0.5, (before, after, history)  # 1.22 -> 2.38 digit words in 6 tokens here
    schedule = torch.load(tmp_path / "checkpoints" / "iteration-2" / "scheduler.pt", weights_only=True)
    assert schedule["last_epoch"] == sum(h["train_steps"] for h in history) == 24
    assert history[0]["reward_mean"] < history[-1]["reward_mean"], history
    assert [h["iteration"] for h in history] == [0, 1, 2]
    assert all(h["kept"] > 0 and h["kept_reward_mean"] >= h["reward_mean"] for h in history)
    assert (tmp_path / "raft" / "iteration-2.jsonl").is_file()
    # A rerun finds every iteration checkpointed and trains only the new one, here on contested prompts
    # alone: at most one kept answer per prompt whose samples disagreed.
    cfg_more = cfg.model_copy(update={"raft": cfg.raft.model_copy(update={"iterations": 4, "contested_only": True})})
    _, history2 = run_raft(policy, tokenizer, prompts, digit_word_reward, cfg_more, cutoff_len=64, eos=eos, out_dir=tmp_path)
    assert [h["iteration"] for h in history2] == [0, 1, 2, 3]
    assert history2[:3] == history
    assert 0 < history2[3]["kept"] <= history2[3]["contested_prompts"] <= history2[3]["prompts"], history2[3]


DIGIT_WORDS = {f"w{i}" for i in range(10)}  # 10 of the small model's 45 words: some in most samples


def digit_word_reward(prompts, completions, **_):
    return [float(sum(word in DIGIT_WORDS for word in c.split())) for c in completions]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grpo_raises_the_reward_through_our_reward_interface_with_a_kl_anchor(small_model_dir, tmp_path):
    """GRPO through TRL takes our reward function as is, reports reward and KL, and raises the reward."""
    tokenizer = load_tokenizer(str(small_model_dir))
    model = load_model(str(small_model_dir), CPU)
    prompts = [{"prompt": " ".join(f"w{(i * 7 + j) % 45}" for j in range(4)), "reference": "0", "task": "toy"}
               for i in range(8)]
    seen: list[dict] = []

    def recording_reward(prompts, completions, **columns):
        seen.append({"n": len(completions), "reference": columns.get("reference")})
        return digit_word_reward(prompts, completions)

    def mean_reward(m) -> float:  # 64 seeded samples, the same before and after
        groups, _ = sample(m, tokenizer, [p["prompt"] for p in prompts], k=8, temperature=1.0, top_p=1.0,
                           max_new_tokens=6, eos=[tokenizer.eos_token_id], seed=123)
        flat = [c for g in groups for c in g]
        return sum(digit_word_reward(None, flat)) / len(flat)

    before = mean_reward(model)
    cfg = AlignmentConfig(method="grpo", learning_rate=2e-2, lr_scheduler="constant", batch_size=4, num_generations=4,
                          max_new_tokens=6, max_steps=8, logging_steps=1, save_steps=4, warmup_ratio=0.0, beta=0.05)
    policy, history, metrics = train_grpo(model, tokenizer, prompts, recording_reward, cfg, CPU, tmp_path)
    after = mean_reward(policy)
    # About 1.1 digit words in 6 tokens before; 2.8 to 3.3 after 8 steps over four global seeds.
    assert after > before + 1.0, (before, after, [h.get("reward") for h in history])
    assert seen and all(call["n"] == 16 and call["reference"] == ["0"] * 16 for call in seen)
    assert "kl_last" in metrics and "reward_last" in metrics  # beta > 0: the KL to the SFT model is reported
    assert (tmp_path / "checkpoints" / "checkpoint-8" / "lmforge-complete").is_file()


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


def _answer_logprobs(model, tokenizer, prompt: str, answer: str) -> list[float]:
    """log p(token | everything before it) of each token of `answer` after `prompt`."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the answer starts on a token boundary
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return logp[len(prompt_ids) - 1 :].tolist()


def _chosen_margins(model, tokenizer, pairs: list[dict]) -> tuple[float, float]:
    """Mean over pairs of chosen-minus-rejected log-probability: summed over the answer's tokens (what DPO
    and KTO's implicit reward read) and per token (what SimPO and ORPO's odds read)."""
    model.eval()
    summed, per_token = [], []
    for p in pairs:
        chosen = _answer_logprobs(model, tokenizer, p["prompt"], p["chosen"])
        rejected = _answer_logprobs(model, tokenizer, p["prompt"], p["rejected"])
        summed.append(sum(chosen) - sum(rejected))
        per_token.append(sum(chosen) / len(chosen) - sum(rejected) / len(rejected))
    return sum(summed) / len(pairs), sum(per_token) / len(pairs)


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_other_preference_methods_raise_the_chosen_answer_over_the_rejected_one(tiny, tmp_path, method):
    model, tokenizer = tiny
    pairs = _pairs(tokenizer, 8)
    summed_before, per_token_before = _chosen_margins(model, tokenizer, pairs)
    cfg = AlignmentConfig(method=method, learning_rate=5e-3, batch_size=4, max_steps=4, logging_steps=1,
                          save_steps=100, warmup_ratio=0.0, max_length=64)
    rows = unpaired(pairs) if method == "kto" else pairs  # KTO: each chosen answer desirable, each rejected not
    policy, history, metrics = train_preference(method, model, tokenizer, rows, cfg, CPU, tmp_path)
    summed_after, per_token_after = _chosen_margins(policy, tokenizer, pairs)
    # Measured over 3 to 5 steps, three global seeds: per token +0.15 (ORPO) to +0.65 (SimPO) nats, summed +2.8 to +6.
    assert per_token_after > per_token_before + 0.1, (method, per_token_before, per_token_after)
    assert summed_after > summed_before + 1.0, (method, summed_before, summed_after)
    policy.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_raft_drops_kept_answers_that_truncation_cut_away(small_model_dir, tmp_path):
    # Prompts of 4 tokens and a cutoff of 3: every kept row would train on no label at all (a wasted step with
    # a zero loss). They are dropped and counted instead.
    from peft import get_peft_model

    tokenizer = load_tokenizer(str(small_model_dir))
    policy = get_peft_model(load_model(str(small_model_dir), CPU), lora_config(AlignmentConfig().lora, "CAUSAL_LM"))
    cfg = AlignmentConfig(method="raft", learning_rate=1e-2, batch_size=4, num_generations=2, max_new_tokens=3,
                          lr_scheduler="constant", warmup_ratio=0.0,
                          raft={"iterations": 1, "prompts_per_iteration": 4, "steps_per_iteration": 2})
    _, history = run_raft(policy, tokenizer, _word_prompts(4), digit_word_reward, cfg, cutoff_len=3,
                          eos=[tokenizer.eos_token_id], out_dir=tmp_path)
    assert history[0]["kept"] > 0 and history[0]["kept_without_answer_tokens"] == history[0]["kept"]
    assert history[0]["train_steps"] == 0


def test_raft_and_ppo_refuse_fp16_they_would_not_scale():
    from components.alignment.stage import refuse_unscaled_fp16
    from components.errors import StageInputError

    for method in ("raft", "ppo"):
        with pytest.raises(StageInputError, match=f"alignment.method={method} .* compute.precision to fp32"):
            refuse_unscaled_fp16(method, "fp16")
        refuse_unscaled_fp16(method, "bf16")
        refuse_unscaled_fp16(method, "fp32")
    for method in ("grpo", "dpo", "kto", "orpo", "simpo"):  # TRL's trainers scale the loss
        refuse_unscaled_fp16(method, "fp16")


def test_grpo_samples_until_the_template_end_of_turn_too(small_model_dir, tmp_path, monkeypatch):
    """One stop rule: the stop ids the stage gives (the EOS and the template's end of turn) are the ids TRL's
    GRPO samples until and masks after, beside the tokenizer's EOS."""
    import trl

    seen: dict = {}

    class Built(Exception):
        pass

    class Spy(trl.GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["eos"] = list(self.eos_token_ids)
            raise Built

    monkeypatch.setattr(trl, "GRPOTrainer", Spy)
    tokenizer = load_tokenizer(str(small_model_dir))
    model = load_model(str(small_model_dir), CPU)
    prompts = [{"prompt": "w1 w2", "reference": "0", "task": "toy"}] * 4
    cfg = AlignmentConfig(method="grpo", batch_size=2, num_generations=2, max_new_tokens=4, max_steps=1)
    with pytest.raises(Built):
        train_grpo(model, tokenizer, prompts, digit_word_reward, cfg, CPU, tmp_path, stop=[tokenizer.eos_token_id, 5])
    assert 5 in seen["eos"] and tokenizer.eos_token_id in seen["eos"]
