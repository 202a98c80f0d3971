"""Constrained choice: score every candidate answer by its log-likelihood given the prompt; pick the best.

For a task with a fixed answer set (Yes/No, the chapter titles) this asks what the model knows without
asking it to produce the answer verbatim, which is cheaper and fairer to a small model. A candidate's
tokens are exactly what training labels for that answer (the prompt + candidate rendered as a
conversation, the assistant turn through its end-of-turn token), so the score is the log-probability
of generating exactly that answer and stopping.

Cost: each prompt runs once (the prompts of a group share their common prefix, run once); its KV cache is
repeated for its candidates, which run as one batch of short sequences. A question with K candidates costs
one prompt forward plus K answer-length rows.
"""

from __future__ import annotations

import copy
import inspect

import torch

from components.data.chat_render import encode_conversations, prepare_template
from components.data.records import IGNORE
from components.runtime import progress


def answer_token_ids(tokenizer, template: str, prompts: list[list[dict]], candidates: list[str],
                     system_prompt: str | None) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt ids per prompt, [answer ids per candidate] per prompt), tokenized the way training does.

    `template` is a tokenize.template value ('auto', a table name or Jinja source).
    """
    tmpl = prepare_template(tokenizer, template)
    conversations = [([*messages, {"role": "assistant", "content": c}], None) for messages in prompts for c in candidates]
    encoded = encode_conversations(tokenizer, tmpl, conversations, system_prompt=system_prompt,
                                   train_on_prompt=False, mask_history=True)
    prompt_ids, answer_ids = [], []
    for q in range(len(prompts)):
        shared, answers = None, []
        for ids, labels in encoded[q * len(candidates) : (q + 1) * len(candidates)]:
            labeled = [i for i, label in enumerate(labels) if label != IGNORE]
            start, end = labeled[0], labeled[-1] + 1
            if shared is None:
                shared = ids[:start]
            elif ids[:start] != shared:  # cannot happen with prefix rendering; would make the scores incomparable
                raise ValueError(f"prompt {q}: candidates change the tokens of the prompt before them")
            answers.append(ids[start:end])
        prompt_ids.append(shared)
        answer_ids.append(answers)
    return prompt_ids, answer_ids


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` during v5; take the name this model's forward has.
    A PEFT wrapper's forward takes **kwargs, so ask the model inside it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def length_buckets(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped by similar length (shortest first; a bucket's longest at most twice its shortest),
    so the rows of one forward pass waste little on padding.

    >>> length_buckets([3, 18, 4, 9, 7])
    [[0, 2], [4, 3], [1]]
    """
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not buckets or lengths[i] > 2 * lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return buckets


@torch.no_grad()
def _score_group(model, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Summed answer log-probabilities for a few prompts (left-padded together) and all their candidates."""
    from transformers import DynamicCache

    from components.models.generation import _forward_rows, common_prefix

    device = next(model.parameters()).device
    # The prompts' shared prefix runs once (components.models.generation); `mask` covers prefix and tails.
    prefix = common_prefix(prompts) if len(prompts) > 1 else 0
    prompt_cache = DynamicCache()
    logits, mask, next_position = _forward_rows(model, prompts, prefix if prefix >= 4 else 0, pad_id, device, 1,
                                                prompt_cache)
    mask, next_position = mask.cpu(), next_position.cpu()
    first = logits[:, -1].float().log_softmax(-1).cpu()  # next-token distribution after each prompt

    owners = [b for b, cands in enumerate(answers) for _ in cands]
    flat = [a for cands in answers for a in cands]
    totals = [float(first[b, a[0]]) for b, a in zip(owners, flat)]
    for bucket in length_buckets([len(a) for a in flat]):
        length = max(len(flat[r]) for r in bucket)
        if length == 1:
            continue
        owner = torch.tensor([owners[r] for r in bucket])
        cand = torch.full((len(bucket), length), pad_id, dtype=torch.long)
        cand_mask = torch.zeros((len(bucket), length), dtype=torch.long)
        for k, r in enumerate(bucket):
            cand[k, : len(flat[r])] = torch.tensor(flat[r])
            cand_mask[k, : len(flat[r])] = 1
        cache = copy.deepcopy(prompt_cache) if len(bucket) < len(flat) else prompt_cache
        cache.batch_select_indices(owner.to(device))  # each candidate row continues its own prompt
        logits = model(
            input_ids=cand[:, :-1].to(device),
            attention_mask=torch.cat([mask[owner], cand_mask[:, :-1]], dim=1).to(device),
            position_ids=(next_position[owner] + torch.arange(length - 1)[None, :]).to(device),
            use_cache=False,
            **{_cache_argument(model): cache},
        ).logits.float()
        targets = cand[:, 1:].to(logits.device)
        logp = (logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)).cpu()
        for k, r in enumerate(bucket):
            totals[r] += float((logp[k] * cand_mask[k, 1:]).sum())
    scores, r = [], 0
    for cands in answers:
        scores.append(totals[r : r + len(cands)])
        r += len(cands)
    return scores


def candidate_logprobs(model, prompts: list[list[int]], answers: list[list[list[int]]], *, pad_id: int,
                       batch_size: int = 32) -> list[list[float]]:
    """log p(answer | prompt) summed over each candidate's tokens, per prompt and candidate.

    Prompts are grouped (shortest first) so that a forward pass holds about `batch_size` candidate rows.
    """
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups, group, rows = [], [], 0
    for i in order:
        if group and rows + len(answers[i]) > batch_size:
            groups.append(group)
            group, rows = [], 0
        group.append(i)
        rows += len(answers[i])
    if group:
        groups.append(group)
    scores: list[list[float]] = [[] for _ in prompts]
    for group in progress(groups, desc="choice", leave=False):
        for i, s in zip(group, _score_group(model, [prompts[i] for i in group], [answers[i] for i in group], pad_id)):
            scores[i] = s
    return scores


def choose(tokenizer, model, template: str, prompts: list[list[dict]], candidates: list[str], *,
           system_prompt: str | None, batch_size: int = 32) -> tuple[list[str], list[list[float]]]:
    """The likeliest candidate for each prompt (first on ties) and every candidate's log-probability."""
    prompt_ids, answer_ids = answer_token_ids(tokenizer, template, prompts, candidates, system_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = candidate_logprobs(model, prompt_ids, answer_ids, pad_id=pad_id, batch_size=batch_size)
    picks = [candidates[max(range(len(s)), key=s.__getitem__)] for s in scores]
    return picks, scores
