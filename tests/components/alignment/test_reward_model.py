"""The reward stage's model: TRL RewardTrainer with LoRA + score head, judged by pairwise accuracy."""

from __future__ import annotations

import random

import pytest

from components.alignment.reward_model import load_classifier, pairwise_accuracy, train_reward_model
from components.config import RewardModelConfig
from components.models.loading import load_tokenizer, select_hardware
from components.pipeline import BaseModelRef

GOOD = ["Essential (primary) hypertension", "Cholera due to Vibrio cholerae", "Type 2 diabetes mellitus"]
BAD = ["0123456789 0123456789", "ABCDEFGHIJKLMNOP", ".,:;()- .,:;()-"]


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = f"<|im_start|>user\nWhat does ICD-10-CM code {rng.choice(['I10', 'A00', 'E11'])} describe?<|im_end|>\n"
        out.append({"prompt": prompt + "<|im_start|>assistant\n", "chosen": rng.choice(GOOD) + "<|im_end|>",
                    "rejected": rng.choice(BAD) + "<|im_end|>"})
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reward_model_separates_a_separable_preference_set(tiny_model_dir, tmp_path):
    base = BaseModelRef(str(tiny_model_dir))
    hardware = select_hardware("cpu", "fp32")
    tokenizer = load_tokenizer(base.source)
    model = load_classifier(base, [], hardware, tokenizer.pad_token_id)
    cfg = RewardModelConfig(max_steps=30, learning_rate=5e-3, batch_size=8, logging_steps=5, save_steps=100,
                            warmup_ratio=0.0, max_length=64)
    before = pairwise_accuracy(model, tokenizer, _pairs(40, seed=1), max_length=64)
    trained, history, metrics = train_reward_model(model, tokenizer, _pairs(64, seed=0), cfg, hardware, tmp_path)
    after = pairwise_accuracy(trained.eval(), tokenizer, _pairs(40, seed=1), max_length=64)
    assert after["accuracy"] > 0.9, (before, after)
    assert after["margin"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    # The checkpoint the trainer wrote is marked complete, so a rerun would resume from it.
    assert any((p / "lmforge-complete").exists() for p in (tmp_path / "checkpoints").glob("checkpoint-*"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reward_model_is_loaded_once_for_the_evaluate_nodes_of_a_run(tiny_model_dir, tmp_path):
    """The four evaluate nodes of a run build a RewardModel each: the second finds the loaded one, scores alike,
    and an adapter written anew is loaded afresh."""
    import os

    from peft import LoraConfig, get_peft_model

    from components.alignment.rewards import RewardModel, load_reward_model

    base = BaseModelRef(str(tiny_model_dir))
    hardware = select_hardware("cpu", "fp32")
    tokenizer = load_tokenizer(base.source)
    adapter = tmp_path / "reward"
    peft_model = get_peft_model(load_classifier(base, [], hardware, tokenizer.pad_token_id),
                                LoraConfig(r=4, target_modules="all-linear", modules_to_save=["score"],
                                           task_type="SEQ_CLS"))
    peft_model.save_pretrained(adapter)
    first = RewardModel(base, [], adapter, hardware, tokenizer, stop="<|im_end|>", max_length=64)
    second = RewardModel(base, [], adapter, hardware, tokenizer, stop="<|im_end|>", max_length=64)
    assert second.model is first.model
    prompts, answers = ["<|im_start|>user\nI10?<|im_end|>\n<|im_start|>assistant\n"] * 2, GOOD[:2]
    fresh = RewardModel.__new__(RewardModel)
    fresh.__dict__.update(first.__dict__, model=load_reward_model(base, [], adapter, hardware, tokenizer.pad_token_id))
    assert second(prompts, answers) == pytest.approx(fresh(prompts, answers), abs=1e-5)
    # Made from a copy of the policy the node holds (the same merged stack) instead of loading it: the same
    # scores, and the policy itself is left as it was (the reward LoRA is merged into the copy).
    import torch

    from components.models.loading import load_with_adapters

    policy = load_with_adapters(base.source, [], hardware)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    copied = RewardModel.__new__(RewardModel)
    copied.__dict__.update(first.__dict__, model=load_reward_model(base, [], adapter, hardware, tokenizer.pad_token_id,
                                                                   policy=policy))
    assert copied(prompts, answers) == pytest.approx(fresh(prompts, answers), abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    with torch.no_grad():  # and the copy is what scores: a policy with other weights scores otherwise
        policy.get_input_embeddings().weight.mul_(2.0)
    other = RewardModel.__new__(RewardModel)
    other.__dict__.update(first.__dict__, model=load_reward_model(base, [], adapter, hardware, tokenizer.pad_token_id,
                                                                  policy=policy))
    assert other(prompts, answers) != pytest.approx(fresh(prompts, answers), abs=1e-5)
    weights = next(adapter.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    assert RewardModel(base, [], adapter, hardware, tokenizer, stop="<|im_end|>", max_length=64).model is not first.model


def test_reward_scores_keep_the_answer_whole_and_match_the_classifier_row_by_row(tiny_model_dir):
    """score_answers: shared prefixes and padding change no score (each row scored alone by the classifier
    itself gives the same), and a prompt too long for max_length loses its start, never the answer."""
    import torch

    from components.alignment.rewards import score_answers

    base = BaseModelRef(str(tiny_model_dir))
    tokenizer = load_tokenizer(base.source)
    torch.manual_seed(0)
    model = load_classifier(base, [], select_hardware("cpu", "fp32"), tokenizer.pad_token_id).eval()
    pairs = _pairs(6, seed=3)
    prompts, answers = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    scores, cut = score_answers(model, tokenizer, prompts, answers, max_length=256, batch_size=4)
    # Grouped (a task per pair): batches stop at each run of labels, here batches of 2, 1, 3 -> 2 + 1, 1, 2 + 1.
    grouped, _ = score_answers(model, tokenizer, prompts, answers, max_length=256, batch_size=2,
                               groups=["a", "a", "b", "c", "c", "c"])
    assert cut == 0
    for prompt, answer, score, in_group in zip(prompts, answers, scores, grouped):
        ids = tokenizer(prompt + answer, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            alone = float(model(**ids).logits[0, 0])
        assert score == pytest.approx(alone, abs=1e-4) and in_group == pytest.approx(alone, abs=1e-4)

    # A long prompt: cut from the left to fit, so the answer (what differs) is still what is scored.
    long_prompt = "<|im_start|>user\n" + "filler words " * 80 + "What does I10 describe?<|im_end|>\n<|im_start|>assistant\n"
    good, bad = GOOD[0] + "<|im_end|>", BAD[0] + "<|im_end|>"
    (s_good, s_bad), cut = score_answers(model, tokenizer, [long_prompt] * 2, [good, bad], max_length=48, batch_size=2)
    assert cut == 2 and s_good != pytest.approx(s_bad, abs=1e-6)
    answer_ids = tokenizer(good, add_special_tokens=False)["input_ids"]
    kept = tokenizer(long_prompt, add_special_tokens=False)["input_ids"][-(48 - len(answer_ids)):] + answer_ids
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([kept])).logits[0, 0])
    assert s_good == pytest.approx(expected, abs=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_kept_reward_model_scores_a_pair_once(tiny_model_dir, tmp_path, monkeypatch):
    """The aligned node's answers are mostly the SFT model's: a pair the kept reward model scored before is
    not scored again (same score, same cut count); a new answer is, task by task."""
    from peft import LoraConfig, get_peft_model

    from components.alignment import rewards

    base = BaseModelRef(str(tiny_model_dir))
    hardware = select_hardware("cpu", "fp32")
    tokenizer = load_tokenizer(base.source)
    adapter = tmp_path / "reward"
    get_peft_model(load_classifier(base, [], hardware, tokenizer.pad_token_id),
                   LoraConfig(r=4, target_modules="all-linear", modules_to_save=["score"], task_type="SEQ_CLS")
                   ).save_pretrained(adapter)
    scored = []
    real = rewards._score_pairs
    monkeypatch.setattr(rewards, "_score_pairs", lambda *a, **kw: scored.append((a[2], kw["groups"])) or real(*a, **kw))
    prompt = "<|im_start|>user\n" + "long " * 40 + "I10?<|im_end|>\n<|im_start|>assistant\n"
    first = rewards.RewardModel(base, [], adapter, hardware, tokenizer, stop="<|im_end|>", max_length=24)
    before = first([prompt, prompt], GOOD[:2], task=["a", "b"])
    assert first.cut_rows == 2 and len(scored) == 1
    second = rewards.RewardModel(base, [], adapter, hardware, tokenizer, stop="<|im_end|>", max_length=24)
    again = second([prompt, prompt, prompt], [GOOD[1], BAD[0], GOOD[0]], task=["b", "b", "a"])
    assert again[0] == before[1] and again[2] == before[0] and second.cut_rows == 3
    assert scored[1] == ([prompt], ["b"])  # only the new answer went through the model
    assert again[1] == pytest.approx(rewards.score_answers(first.model, tokenizer, [prompt], [BAD[0] + "<|im_end|>"],
                                                           max_length=24, batch_size=8)[0][0], abs=1e-5)
