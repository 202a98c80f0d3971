"""RAFT's parts without a model: samples are named by index, and alignment.missing_eos_penalty lowers the
reward of an answer cut at max_new_tokens and of no finished one."""

from __future__ import annotations

import pytest

from components.alignment import raft
from components.config import AlignmentConfig

EOS = 2
PROMPTS = [{"prompt": "p0", "messages": [{"role": "user", "content": "q0"}], "reference": "r", "task": "t"}]


class _Tokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [7, 8]}


def _fake_sample(texts: list[str], ids: list[list[int]]):
    """A stand-in for sampling.sample: one prompt whose completions are `texts` with token ids `ids`."""

    def sample(model, tokenizer, prompts, *, ids: list, **_):
        ids.append([list(x) for x in sampled_ids])
        return [list(texts)], sum(len(x) for x in sampled_ids)

    sampled_ids = ids
    return sample


def test_a_kept_sample_trains_on_its_own_tokens_when_another_decodes_to_the_same_text(monkeypatch):
    # Two samples decode to "A01" from different tokens; the first scores higher and is kept: its own ids
    # must be the ones trained on (keyed by text, the later sample's tokens overwrote them).
    monkeypatch.setattr(raft, "sample", _fake_sample(["A01", "A01"], [[5, EOS], [6, 9, EOS]]))
    scores = iter([[0.9, 0.1]])
    cfg = AlignmentConfig(method="raft", num_generations=2)
    sampled = raft._sample_and_rank(None, _Tokenizer(), PROMPTS, lambda *a, **k: next(scores), cfg, [EOS], 0)
    assert sampled.kept == [(0, 0, "A01", 0.9)]
    rows, cut_off = raft._training_rows(_Tokenizer(), PROMPTS, sampled, cutoff_len=16)
    assert cut_off == 0
    assert rows == [{"input_ids": [7, 8, 5, EOS], "labels": [-100, -100, 5, EOS]}]


@pytest.mark.parametrize("penalty", [None, 0.75])
def test_missing_eos_penalty_lowers_only_the_truncated_answers_reward(monkeypatch, penalty):
    # Sample 0 stopped (its ids end with the stop token); sample 1 ran to max_new_tokens without it.
    monkeypatch.setattr(raft, "sample", _fake_sample(["done", "cut off"], [[5, EOS], [6, 9, 9]]))
    cfg = AlignmentConfig(method="raft", num_generations=2, max_new_tokens=3, missing_eos_penalty=penalty)
    sampled = raft._sample_and_rank(None, _Tokenizer(), PROMPTS, lambda *a, **k: [1.0, 1.0], cfg, [EOS], 0)
    assert sampled.groups == [[("done", 1.0), ("cut off", 1.0 - (penalty or 0.0))]]
    assert sampled.unfinished == 1
    entry = raft._entry(0, PROMPTS, sampled, [], 0, train_seconds=0.0)
    assert entry["unfinished_fraction"] == 0.5
    assert entry["reward_mean"] == pytest.approx(1.0 - (penalty or 0.0) / 2)


def test_missing_eos_penalty_is_refused_where_nothing_reads_it():
    from pydantic import ValidationError

    AlignmentConfig(method="raft", missing_eos_penalty=1.0)
    AlignmentConfig(method="ppo", missing_eos_penalty=1.0)
    with pytest.raises(ValidationError, match="alignment.missing_eos_penalty .*method=grpo .* TRL.s GRPO trainer"):
        AlignmentConfig(method="grpo", missing_eos_penalty=1.0)
    with pytest.raises(ValidationError, match="alignment.missing_eos_penalty .*method=dpo"):
        AlignmentConfig(method="dpo", missing_eos_penalty=1.0)
    with pytest.raises(ValidationError):
        AlignmentConfig(method="raft", missing_eos_penalty=-1.0)
