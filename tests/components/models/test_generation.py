"""The one generation path: same greedy tokens as transformers' generate, shared prefixes and dropped rows
included; the reference's KL is the exact KL over the generated positions; nucleus sampling stays in the nucleus."""

from __future__ import annotations

import copy

import pytest
import torch

from components.models.generation import (
    _pick,
    _prefill,
    _prefill_segments,
    common_prefix,
    completion_text,
    decode,
    keep_prefills,
    segments_of,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


PROMPTS = ["Which ICD-10-CM chapter contains code K27.9?", "Which ICD-10-CM chapter contains code A00?",
           "Which ICD-10-CM chapter contains code S72.001A, a long one?", "Is A00 billable?", "x"]


def _reference_greedy(model, ids: list[int], max_new: int, stop: set[int]) -> list[int]:
    """One prompt, no padding, no cache tricks: transformers' own greedy search, cut after the first stop."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stop), pad_token_id=0)
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):
        if t in stop:
            return new[: i + 1]
    return new


def test_greedy_decoding_matches_generate_with_shared_prefixes_and_rows_that_stop_early(tiny):
    model, tokenizer = tiny
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    # A stop token the tiny model actually produces: the first greedy token of one prompt stops that row at
    # once, while the others go on (the batch drops it).
    first = _reference_greedy(model, encoded[1], 1, set())[0]
    stop = {first}
    expected = [_reference_greedy(model, ids, 8, stop) for ids in encoded]
    assert any(len(e) == 1 for e in expected) and any(len(e) > 1 for e in expected)
    for batch_size in (1, 3, 8):
        got = decode(model, encoded, max_new_tokens=8, stop=sorted(stop), pad_id=0, batch_size=batch_size,
                     min_prefix=1)
        assert [c.ids for c in got] == expected
        assert [c.stopped for c in got] == [e[-1] in stop for e in expected]
    assert completion_text(tokenizer, got[0]) == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_a_shared_prefix_and_a_padded_tail_give_each_row_its_unpadded_logits(tiny):
    # Greedy tokens of a random tiny model hardly move with a wrong position; the logits do (~1e-3).
    model, tokenizer = tiny
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    prefix = common_prefix(rows)
    assert prefix >= 4
    with torch.no_grad():
        logits, _, mask, position = _prefill(model, rows, prefix, 0, torch.device("cpu"))
        for b, ids in enumerate(rows):
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert torch.allclose(logits[b], alone, atol=1e-5)
            assert int(position[b]) == len(ids) and int(mask[b].sum()) == len(ids)


def test_groups_of_one_batch_decode_as_if_alone(tiny):
    """Three kinds of prompt in one batch, each with its own shared prefix: the caches are joined (padded
    on the left to one length) and every row still gets transformers' own greedy tokens and its KL."""
    model, tokenizer = tiny
    texts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], "Is A00 billable?", "Is K27.9 billable at all?", "x"]
    groups = ["chapter", "chapter", "chapter", "billable", "billable", "other"]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    first = _reference_greedy(model, encoded[3], 1, set())[0]
    expected = [_reference_greedy(model, ids, 7, {first}) for ids in encoded]
    assert any(len(e) == 1 for e in expected) and any(len(e) > 1 for e in expected)
    # Greedy tokens of a random tiny model hardly move with a wrong position or a stray key; the logits do:
    # the joined prefill and one decoding step on the joined cache give each row its unpadded logits.
    with torch.no_grad():
        logits, cache, mask, position = _prefill_segments(model, encoded, segments_of(groups, 6), 0,
                                                          torch.device("cpu"), 1)
        assert cache.get_seq_length() == mask.shape[1] > min(len(e) for e in encoded) and int(mask[-1].sum()) == 1
        token = torch.full((6, 1), 7)
        step = model(input_ids=token, attention_mask=torch.cat([mask, torch.ones(6, 1, dtype=mask.dtype)], 1),
                     position_ids=position, cache=cache, use_cache=True).logits[:, -1]
        for b, ids in enumerate(encoded):
            alone = model(input_ids=torch.tensor([ids + [7]])).logits[0]
            assert torch.allclose(logits[b], alone[-2], atol=1e-5) and torch.allclose(step[b], alone[-1], atol=1e-5)
    got = decode(model, encoded, max_new_tokens=7, stop=[first], pad_id=0, batch_size=6, groups=groups, min_prefix=1)
    assert [c.ids for c in got] == expected
    same = decode(model, encoded, max_new_tokens=4, stop=[], pad_id=0, groups=groups, min_prefix=1,
                  reference=copy.deepcopy(model))
    assert all(kl == pytest.approx(0.0, abs=1e-6) for c in same for kl in c.kl) and all(len(c.kl) == 4 for c in same)
    with pytest.raises(ValueError, match="2 group labels for 6 prompts"):
        decode(model, encoded, max_new_tokens=1, stop=[], pad_id=0, groups=groups[:2])


def test_segments_are_runs_of_equal_labels():
    assert segments_of(None, 3) == [range(3)]
    assert segments_of([1, 1, 2, 2, 2, 1], 6) == [range(0, 2), range(2, 5), range(5, 6)]


def test_common_prefix_leaves_every_row_a_token_of_its_own():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts (k samples of one prompt)
    assert common_prefix([[1, 2], [3, 2]]) == 0
    assert common_prefix([[7], [7, 8]]) == 0


def test_the_reference_kl_is_the_exact_kl_at_each_generated_position(tiny):
    model, tokenizer = tiny
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    same = decode(model, encoded, max_new_tokens=5, stop=[], pad_id=0, reference=copy.deepcopy(model))
    assert all(kl == pytest.approx(0.0, abs=1e-6) for c in same for kl in c.kl)

    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.get_output_embeddings().weight.add_(0.5 * torch.randn_like(moved.get_output_embeddings().weight))
    got = decode(moved, encoded, max_new_tokens=5, stop=[], pad_id=0, batch_size=3, reference=model)
    for prompt, completion in zip(encoded, got):
        # By hand: one unpadded forward of prompt + answer through each model; the distribution at the
        # position before each answer token is the one that chose it.
        ids = torch.tensor([prompt + completion.ids])
        with torch.no_grad():
            lp = torch.log_softmax(moved(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
            lq = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
        exact = (lp.exp() * (lp - lq)).sum(-1)
        assert completion.kl == pytest.approx(exact.tolist(), rel=1e-3, abs=1e-6)
        assert len(completion.kl) == len(completion.ids) == 5
    assert sum(sum(c.kl) for c in got) > 1e-3


def test_a_kept_reference_reads_only_the_answers_and_gives_the_same_kl(tiny, monkeypatch):
    """The aligned evaluation's reference is the model the adapted one decoded from, on the same prompts: kept,
    it remembers those prefills, and the KL pass then runs the answers alone, to the same exact KL."""
    from components.models import generation

    model, tokenizer = tiny
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3] + ["Is A00 billable?"]]
    groups = ["chapter"] * 3 + ["billable"]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.get_output_embeddings().weight.add_(0.5 * torch.randn_like(moved.get_output_embeddings().weight))
    plain = decode(moved, encoded, max_new_tokens=5, stop=[], pad_id=0, reference=model, groups=groups, min_prefix=1)
    reference = copy.deepcopy(model)
    keep_prefills(reference)
    decode(reference, encoded, max_new_tokens=2, stop=[], pad_id=0, groups=groups, min_prefix=1)  # "the adapted node"
    assert len(reference.__dict__["_lmforge_prefills"]) == 2  # one prefill per group
    rows_run = []
    real = generation._forward_rows
    monkeypatch.setattr(generation, "_forward_rows", lambda m, rows, *a, **k: rows_run.append((m, rows)) or real(m, rows, *a, **k))
    kept = decode(moved, encoded, max_new_tokens=5, stop=[], pad_id=0, reference=reference, groups=groups, min_prefix=1)
    assert [c.ids for c in kept] == [c.ids for c in plain]
    for a, b in zip(kept, plain):
        assert a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-6)
    assert all(m is moved for m, _ in rows_run)  # the reference ran no prompt again
    assert sum(sum(c.kl) for c in kept) > 1e-3


def test_nucleus_sampling_draws_only_inside_the_nucleus_renormalised():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    assert {int(_pick(logits, 1.0, 0.5, gen)) for _ in range(50)} == {0}  # 0.6 alone reaches 0.5
    draws = [int(_pick(logits, 1.0, 0.8, gen)) for _ in range(3000)]
    assert set(draws) == {0, 1}  # 0.6 + 0.3 reaches 0.8: token 2 is never drawn
    assert draws.count(0) / len(draws) == pytest.approx(2 / 3, abs=0.03)  # 0.6 / 0.9, renormalised
    assert int(_pick(logits, 0.0, 1.0, gen)) == 0


def test_seeded_sampling_repeats_and_samples_of_one_prompt_differ(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]

    def draw(seed):
        return [c.ids for c in decode(model, [ids] * 4, max_new_tokens=6, stop=[], pad_id=0, temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed))]

    first = draw(1)
    assert first == draw(1)
    assert len({tuple(r) for r in first}) > 1


def _repetitive_prompts(tokenizer) -> list[list[int]]:
    """Prompts whose text repeats itself (a code list, a copied phrase), so that prompt lookup finds proposals,
    and prompts of other lengths beside them."""
    texts = ["codes: K27.9 A00 K27.9 A00 K27.9 A00 K27.9", "the chapter of the chapter of the chapter of the",
             "Which ICD-10-CM chapter contains code S72.001A, a long one?", "x", "a b c a b c a b"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_prompt_lookup_decoding_keeps_the_greedy_answers_in_fewer_passes(tiny):
    model, tokenizer = tiny
    encoded = _repetitive_prompts(tokenizer)
    first = _reference_greedy(model, encoded[3], 1, set())[0]  # a token the model produces: one row stops early
    for batch_size in (2, 8):
        plain_stats, fast_stats = {}, {}
        plain = decode(model, encoded, max_new_tokens=16, stop=[first], pad_id=0, batch_size=batch_size,
                       min_prefix=1, stats=plain_stats)
        fast = decode(model, encoded, max_new_tokens=16, stop=[first], pad_id=0, batch_size=batch_size,
                      min_prefix=1, lookahead=4, stats=fast_stats)
        assert [c.ids for c in fast] == [c.ids for c in plain]
        assert [c.stopped for c in fast] == [c.stopped for c in plain]
        assert any(c.stopped for c in plain) and any(len(c.ids) == 16 for c in plain)
        assert fast_stats["accepted"] > 0 and fast_stats["proposed"] >= fast_stats["accepted"]
        assert fast_stats["forward_passes"] < plain_stats["forward_passes"]
    assert [c.ids for c in plain] == [_reference_greedy(model, ids, 16, {first}) for ids in encoded]


def test_prompt_lookup_decoding_gives_the_same_reference_kl_and_streams_every_token(tiny):
    model, tokenizer = tiny
    encoded = _repetitive_prompts(tokenizer)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.get_output_embeddings().weight.add_(0.1 * torch.randn_like(moved.get_output_embeddings().weight))
    plain = decode(moved, encoded, max_new_tokens=12, stop=[], pad_id=0, batch_size=3, reference=model)
    heard: dict[int, list[int]] = {}
    fast = decode(moved, encoded, max_new_tokens=12, stop=[], pad_id=0, batch_size=3, reference=model, lookahead=3,
                  on_tokens=lambda i, ids: heard.setdefault(i, []).extend(ids))
    assert [c.ids for c in fast] == [c.ids for c in plain]
    for p, f in zip(plain, fast):
        assert f.kl == pytest.approx(p.kl, rel=1e-3, abs=1e-6)
    assert heard == {i: c.ids for i, c in enumerate(fast)}


def test_prompt_lookup_proposes_what_followed_the_latest_match_and_refuses_sampling(tiny):
    from components.models.generation import prompt_lookup

    assert prompt_lookup([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]  # the latest earlier match of (1, 2)
    assert prompt_lookup([5, 6, 7], 3) == []  # nothing repeats
    assert prompt_lookup([9, 9, 9, 9], 2) == [9]  # up to the end of the context
    with pytest.raises(ValueError, match="greedy"):
        decode(tiny[0], [[1, 2, 3]], max_new_tokens=2, stop=[], pad_id=0, temperature=0.7, lookahead=2)
