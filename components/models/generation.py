"""The one generation path: batched, KV-cached decoding that stops every row at the template's end of turn.

Evaluation, RAFT sampling and the evaluation's sampled rewards all decode through `decode`. It is written
by hand rather than with `model.generate` for two reasons that dominate the cost on a CPU, where every
token is compute-bound (bench/eval_profile.py):

- Shared prompt prefixes are encoded once. The prompts of one batch usually begin with the same tokens (the
  template's system turn and the task's question stem; all of them when one prompt is sampled k times):
  that prefix is run once and its keys and values are shared by every row. The rows' remaining tokens are
  padded on the left of their own part, so the attention mask has a hole between prefix and suffix and
  the positions are given explicitly.
- Prompts of several kinds share one decoding batch without losing their prefixes: with `groups` (a label
  per prompt: a task, or the prompt itself for k samples of it), each group's rows are prefilled with their
  own shared prefix and the groups' caches are then joined, left-padded to one length, into one batch.
  Decoding is bound by reading the weights once per step, not by the rows in it (SmolLM2-135M on one CPU
  thread: 9.6 ms a token at 30 rows, 4.9 ms at 90), so one batch of 90 answers costs about half as much
  as three batches of 30.
- A row that has stopped leaves the batch: its cache rows are dropped, so short answers (Yes/No, a short
  chapter name) stop costing compute while the longest answer of the batch finishes.

With a `reference` model, each row also gets the exact KL(model || reference) of the next-token distributions
at every position it generated (the stop token's included): the model's distributions are kept while it
decodes, and once a batch has finished the reference reads prompts and answers in one forward pass with the
same shared prefix (`continuation_logprobs`), which costs a prefill rather than a second decoding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Completion:
    """One generated answer: its token ids (through the stop token, when one came), whether it stopped
    before the token limit, and (with a reference) the KL at each generated position."""

    ids: list[int] = field(default_factory=list)
    stopped: bool = False
    kl: list[float] | None = None
    logprobs: list = field(default_factory=list, repr=False)  # with a reference: the model's, until the KL is in


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos and the template's end-of-turn token."""
    from components.data.chat_render import prepare_template

    ids = {tokenizer.eos_token_id}
    stop = prepare_template(tokenizer, template).stop_id
    if stop is not None:
        ids.add(stop)
    return sorted(i for i in ids if i is not None)


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix every row shares, leaving each row at least one token of its own
    (the last prompt token's logits choose the first answer token)."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


@torch.no_grad()
def decode(model, prompts: list[list[int]], *, max_new_tokens: int, stop: list[int], pad_id: int,
           batch_size: int = 32, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           reference=None, min_prefix: int = 4, groups: list | None = None, lookahead: int = 0,
           on_tokens: Callable[[int, list[int]], None] | None = None, stats: dict | None = None) -> list[Completion]:
    """Complete each prompt (token ids) greedily (temperature 0) or by sampling at `temperature` from the
    nucleus `top_p`; rows are batched `batch_size` at a time in the order given. Without `groups` a batch
    shares its common prefix; with `groups` (one label per prompt, equal labels next to each other) each
    run of equal labels in a batch shares its own. Returns one Completion per prompt, in order.

    `lookahead` k > 0 (greedy only) decodes by prompt lookup: up to k tokens are proposed per row from its own
    prompt and answer (see `lookahead_steps`) and checked in one forward pass; the answers are the greedy ones.
    `on_tokens(i, ids)` hears each prompt's new tokens as they are chosen (a chat streams them); `stats` gets
    the counts of forward passes, proposed and accepted tokens."""
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise ValueError("decode: every prompt needs at least one token")
    if groups is not None and len(groups) != len(prompts):
        raise ValueError(f"decode: {len(groups)} group labels for {len(prompts)} prompts")
    if lookahead and temperature > 0:
        raise ValueError("decode: lookahead (prompt-lookup decoding) keeps greedy answers; it does not sample")
    stats = stats if stats is not None else {}
    for key in ("forward_passes", "proposed", "accepted"):
        stats.setdefault(key, 0)
    model.eval()
    if reference is not None:
        reference.eval()
    out: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        labels = groups[start : start + batch_size] if groups is not None else None
        heard = None if on_tokens is None else (lambda i, ids, first=start: on_tokens(first + i, ids))
        steps = Steps(max_new_tokens=max_new_tokens, stop=frozenset(stop), pad_id=pad_id, temperature=temperature,
                      top_p=top_p, generator=generator, keep_logprobs=reference is not None, lookahead=lookahead,
                      on_tokens=heard, stats=stats)
        out.extend(_decode_batch(model, prompts[start : start + batch_size], steps, reference=reference,
                                 min_prefix=min_prefix,
                                 segments=segments_of(labels, len(prompts[start : start + batch_size]))))
    return out


@dataclass
class Steps:
    """How a batch decodes after its prefill: the limits, the stop tokens, how tokens are picked, and who hears."""

    max_new_tokens: int
    stop: frozenset
    pad_id: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    keep_logprobs: bool = False
    lookahead: int = 0
    on_tokens: Callable[[int, list[int]], None] | None = None
    stats: dict = field(default_factory=dict)

    def emit(self, completion: Completion, row: int, tokens: list[int], logits: torch.Tensor | None) -> bool:
        """Append `tokens` (chosen from `logits`, one row each, when kept) to the row's answer up to its stop token
        or the token limit; True while the row goes on."""
        taken = []
        for j, token in enumerate(tokens):
            taken.append(token)
            completion.ids.append(token)
            if self.keep_logprobs:
                completion.logprobs.append(torch.log_softmax(logits[j], -1))
            if token in self.stop:
                completion.stopped = True
                break
            if len(completion.ids) >= self.max_new_tokens:
                break
        if self.on_tokens is not None:
            self.on_tokens(row, taken)
        return not completion.stopped and len(completion.ids) < self.max_new_tokens


def segments_of(labels: list | None, n: int) -> list[range]:
    """The runs of equal consecutive labels, as index ranges (one run of `n` rows without labels).

    >>> segments_of(["a", "a", "b", "a"], 4)
    [range(0, 2), range(2, 3), range(3, 4)]
    """
    if labels is None:
        return [range(n)]
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            runs.append(range(start, i))
            start = i
    return runs


def _forward_rows(model, rows: list[list[int]], prefix: int, pad_id: int, device, keep: int, cache=None):
    """Run token rows: the shared prefix once (its keys and values expanded to every row), then each row's own
    tokens, left-padded within their part. Returns the logits of the last `keep` positions; with a `cache`,
    fills it, and the attention mask and each row's next position come back too."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache()
    n = len(rows)
    if prefix:
        head = torch.tensor([rows[0][:prefix]], device=device)
        model(input_ids=head, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
    ids, mask, positions = tail_batch(rows, prefix, pad_id)
    mask = mask.to(device)
    logits = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device), cache=cache,
                   use_cache=True, logits_to_keep=keep).logits
    return logits, mask, positions[:, -1:].to(device) + 1


def tail_batch(rows: list[list[int]], prefix: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) of each row's tokens after a shared `prefix` already in the
    cache: the tails left-padded to one width, the mask covering prefix and tails (a hole where a tail is
    padded), the positions going on from the prefix's."""
    ids, tail_mask = left_pad([r[prefix:] for r in rows], pad_id)
    positions = (prefix + tail_mask.cumsum(-1) - 1).clamp(min=prefix)
    return ids, torch.cat([torch.ones((len(rows), prefix), dtype=torch.long), tail_mask], dim=1), positions


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token rows padded on the left to the longest (an empty row: all padding).

    By hand, not with the tokenizer: a padded tokenizer call leaves padding switched on in the fast tokenizer's
    backend, which would then pad the exact encodings of components/data/encoding.py.

    >>> left_pad([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [0, 7]]
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


KEPT_PREFILLS = 8  # prompt batches whose prefill a kept model remembers (each ~10 MB for 30 demo prompts)


def keep_prefills(model) -> None:
    """Let `model` remember its last few prompt prefills (logits, keys and values, by the prompts' token ids).
    Only for a model that is never trained while kept (components.models.loading.kept_model): the aligned
    evaluation's reference is the model the adapted evaluation just decoded from, on the same prompts, so its
    KL pass reads the answers alone (`continuation_logprobs`). A prefix cache, as serving engines keep one."""
    from collections import OrderedDict

    model.__dict__.setdefault("_lmforge_prefills", OrderedDict())


def _prefill(model, rows: list[list[int]], prefix: int, pad_id: int, device) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor]:
    """The prompts through `_forward_rows`: (last-position logits, cache, attention mask, next position per row).
    A model that keeps its prefills (keep_prefills) answers a batch of prompts it has read before from memory."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kept, key = model.__dict__.get("_lmforge_prefills"), tuple(map(tuple, rows))
    saved = kept.get(key) if kept is not None else None  # one lookup: nodes side by side share a kept model
    if saved is not None:
        with contextlib.suppress(KeyError):
            kept.move_to_end(key)
        return _restored(saved)
    cache = DynamicCache()
    logits, mask, position = _forward_rows(model, rows, prefix, pad_id, device, 1, cache)
    out = logits[:, -1].float(), cache, mask, position
    if kept is not None and all(type(layer) is DynamicLayer for layer in cache.layers):
        kept[key] = (out[0].clone(), [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers],
                     mask.clone(), position.clone())
        while len(kept) > KEPT_PREFILLS:
            kept.popitem(last=False)
    return out


def _restored(saved) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor]:
    """A remembered prefill as `_prefill` returns one, every tensor a copy (decoding extends and cuts them)."""
    from transformers import DynamicCache

    logits, layers, mask, position = saved
    cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
    return logits.clone(), cache, mask.clone(), position.clone()


def shared_prefix(rows: list[list[int]], min_prefix: int) -> int:
    """common_prefix, or 0 when it is shorter than `min_prefix` (too short to be worth a pass of its own)."""
    prefix = common_prefix(rows) if len(rows) > 1 else 0
    return prefix if prefix >= min_prefix else 0


def _prefill_segments(model, rows: list[list[int]], segments: list[range], pad_id: int, device,
                      min_prefix: int) -> tuple[torch.Tensor, object, torch.Tensor, torch.Tensor] | None:
    """`_prefill` of each segment of `rows` with its own shared prefix, joined into one batch: the caches and
    attention masks left-padded to the longest (padding the mask leaves out), the positions as they are.
    None when the model's cache has layers that cannot be joined this way (sliding windows, quantized)."""
    from transformers.cache_utils import DynamicLayer

    parts = [_prefill(model, [rows[i] for i in seg], shared_prefix([rows[i] for i in seg], min_prefix), pad_id,
                      device) for seg in segments]
    if len(parts) == 1:
        return parts[0]
    caches = [cache for _, cache, _, _ in parts]
    if any(type(layer) is not DynamicLayer for cache in caches for layer in cache.layers):
        return None
    width = max(mask.shape[1] for _, _, mask, _ in parts)

    def padded(t: torch.Tensor, dim: int) -> torch.Tensor:  # zeros on the left of `dim`, up to `width`
        shape = list(t.shape)
        shape[dim] = width - t.shape[dim]
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    joined = caches[0]
    for i, layer in enumerate(joined.layers):
        layer.keys = torch.cat([padded(c.layers[i].keys, -2) for c in caches])
        layer.values = torch.cat([padded(c.layers[i].values, -2) for c in caches])
    return (torch.cat([logits for logits, _, _, _ in parts]), joined,
            torch.cat([padded(mask, 1) for _, _, mask, _ in parts]), torch.cat([pos for _, _, _, pos in parts]))


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next tokens: the argmax, or a draw at `temperature` from the smallest set of tokens whose probability
    reaches `top_p` (renormalised over that set)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_batch(model, rows, steps: Steps, *, reference, min_prefix, segments) -> list[Completion]:
    device = next(model.parameters()).device
    prefilled = _prefill_segments(model, rows, segments, steps.pad_id, device, min_prefix)
    if prefilled is None:  # caches that cannot be joined: each segment decodes as a batch of its own
        out = []
        for seg in segments:
            part = Steps(**{**steps.__dict__, "on_tokens": None if steps.on_tokens is None else
                            (lambda i, ids, seg=seg: steps.on_tokens(seg[i], ids))})
            out += _decode_batch(model, [rows[i] for i in seg], part, reference=reference, min_prefix=min_prefix,
                                 segments=[range(len(seg))])
        return out
    done = [Completion() for _ in rows]
    (lookahead_steps if steps.lookahead else plain_steps)(model, rows, done, prefilled, steps)
    if reference is not None:
        ref = [logq for seg in segments for logq in continuation_logprobs(
            reference, [rows[i] for i in seg], [done[i].ids for i in seg], pad_id=steps.pad_id, min_prefix=min_prefix)]
        for completion, logq in zip(done, ref):
            logp = torch.stack(completion.logprobs)
            completion.kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0).tolist()  # rounding: -1e-9
            completion.logprobs = []
    return done


def plain_steps(model, rows, done: list[Completion], prefilled, steps: Steps) -> None:
    """One token per row per forward pass; a row that stops leaves the batch (its cache rows are dropped)."""
    logits, cache, mask, position = prefilled
    active = list(range(len(rows)))  # batch row -> index into `done`
    while True:
        tokens = _pick(logits, steps.temperature, steps.top_p, steps.generator)
        keep = [b for b, row in enumerate(active) if steps.emit(done[row], row, [int(tokens[b])], logits[b : b + 1])]
        if not keep:
            break
        if len(keep) < len(active):  # drop the rows that stopped from everything that is batched
            index = torch.tensor(keep, device=logits.device)
            cache.batch_select_indices(index)
            mask, position, tokens = mask[index], position[index], tokens[index]
            active = [active[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                       cache=cache).logits[:, -1].float()
        steps.stats["forward_passes"] += 1
        position = position + 1


def prompt_lookup(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to `k` tokens proposed for what follows `context`: those that followed the latest earlier occurrence
    of its last n tokens, for the longest min_ngram <= n <= max_ngram that occurs (Saxena 2023, "prompt lookup
    decoding"; answers that copy from their prompt, as extraction and coding answers do, are proposed right).
    A single repeated token says little about what comes next: on the demo's questions one-token matches were
    mostly rejected, and every rejected token costs a position in the checking pass.

    >>> prompt_lookup([7, 1, 2, 3, 9, 4, 1, 2], 3)
    [3, 9, 4]
    """
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + k]
    return []


def lookahead_steps(model, rows, done: list[Completion], prefilled, steps: Steps) -> None:
    """Greedy decoding that checks proposed tokens (prompt_lookup) in the same forward pass as the next one.

    Each row's block is [its next token, its proposals], right-padded to the batch's widest; the proposals the
    model agrees with (its own argmax at each position, left to right) are kept, the rest stay in the cache as
    a hole in the attention mask, as padding does, and the row's positions go on after the last kept token.
    So every kept token is the one plain greedy decoding chooses, from the same context. Hand-written because
    transformers' prompt lookup (generate's prompt_lookup_num_tokens) decodes one row at a time."""
    logits, cache, mask, position = prefilled
    active = list(range(len(rows)))
    contexts = [list(r) for r in rows]
    budget = [steps.lookahead] * len(rows)  # each row's proposal length: +2 after a pass that kept all, -1 after not
    while True:
        tokens = logits.argmax(-1)
        keep = []
        for b, row in enumerate(active):
            if steps.emit(done[row], row, [int(tokens[b])], logits[b : b + 1]):
                contexts[row].append(int(tokens[b]))
                keep.append(b)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=logits.device)
            cache.batch_select_indices(index)
            mask, position, tokens = mask[index], position[index], tokens[index]
            active = [active[b] for b in keep]
        drafts = [prompt_lookup(contexts[row], min(budget[row], steps.max_new_tokens - len(done[row].ids)))
                  for row in active]
        block, block_mask = _draft_block(tokens, drafts, steps.pad_id)
        width = block.shape[1]
        out = model(input_ids=block, attention_mask=torch.cat([mask, block_mask], dim=1),
                    position_ids=position + torch.arange(width, device=position.device), use_cache=True,
                    cache=cache).logits.float()
        steps.stats["forward_passes"] += 1
        agreed = out.argmax(-1)
        keep, next_logits = [], []
        for b, (row, draft) in enumerate(zip(active, drafts)):
            n = 0
            while n < len(draft) and draft[n] == int(agreed[b, n]):
                n += 1
            before = len(done[row].ids)
            alive = steps.emit(done[row], row, draft[:n], out[b, :n]) if n else True
            kept = len(done[row].ids) - before  # the accepted ones, up to a stop token or the limit
            contexts[row].extend(draft[:kept])
            steps.stats["proposed"] += len(draft)
            steps.stats["accepted"] += kept
            if draft:  # the schedule of transformers' assisted generation, per row
                budget[row] = min(budget[row] + 2, steps.lookahead) if n == len(draft) else max(budget[row] - 1, 1)
            block_mask[b, 1 + kept :] = 0
            position[b] += 1 + kept
            next_logits.append(out[b, kept])
            if alive:
                keep.append(b)
        mask = torch.cat([mask, block_mask], dim=1)
        logits = torch.stack(next_logits)
        if len(keep) < len(active):
            if not keep:
                break
            index = torch.tensor(keep, device=logits.device)
            cache.batch_select_indices(index)
            mask, position, logits = mask[index], position[index], logits[index]
            active = [active[b] for b in keep]


def _draft_block(tokens: torch.Tensor, drafts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of each row's next token followed by its proposals, right-padded to the widest row."""
    width = 1 + max(len(d) for d in drafts)
    block = torch.full((len(drafts), width), pad_id, dtype=torch.long, device=tokens.device)
    block_mask = torch.zeros((len(drafts), width), dtype=torch.long, device=tokens.device)
    block[:, 0] = tokens
    for b, draft in enumerate(drafts):
        if draft:
            block[b, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
        block_mask[b, : 1 + len(draft)] = 1
    return block, block_mask


@torch.no_grad()
def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], *, pad_id: int,
                          min_prefix: int = 4) -> list[torch.Tensor]:
    """For each prompt and its (non-empty) continuation, in one forward pass: the model's log-probabilities
    over the vocabulary at each continuation position, (len(continuation), vocab). The batch's shared prefix
    is run once; the continuations end every row, so only their positions get logits."""
    if tuple(map(tuple, prompts)) in model.__dict__.get("_lmforge_prefills", ()):
        return _continued_logprobs(model, prompts, continuations, pad_id)
    rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
    prefix = min(shared_prefix(rows, min_prefix), min(len(p) for p in prompts) - 1)
    prefix = prefix if prefix >= min_prefix else 0
    device = next(model.parameters()).device
    keep = max(len(c) for c in continuations) + 1
    logits, _, _ = _forward_rows(model, rows, prefix, pad_id, device, keep)
    return [torch.log_softmax(logits[b, keep - len(c) - 1 : keep - 1].float(), -1) for b, c in enumerate(continuations)]


def _continued_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """continuation_logprobs for prompts whose prefill the model remembers: the first continuation token's
    distribution is the prefill's, and the rest of each continuation (padded on the right, where nothing
    reads it) runs on the remembered keys and values."""
    first, cache, mask, position = _prefill(model, prompts, 0, pad_id, next(model.parameters()).device)
    width = max(len(c) for c in continuations) - 1
    later = first.new_zeros((len(prompts), 0, first.shape[-1]))
    if width > 0:
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        more = torch.zeros((len(prompts), width), dtype=mask.dtype)
        for b, c in enumerate(continuations):
            ids[b, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            more[b, : len(c) - 1] = 1
        later = model(input_ids=ids.to(mask.device), attention_mask=torch.cat([mask, more.to(mask.device)], dim=1),
                      position_ids=position + torch.arange(width, device=mask.device), cache=cache,
                      use_cache=True).logits.float()
    return [torch.log_softmax(torch.cat([first[b : b + 1], later[b, : len(c) - 1]]), -1)
            for b, c in enumerate(continuations)]


def completion_text(tokenizer, completion: Completion) -> str:
    """The answer's text: its ids decoded without special tokens (the stop token is one), stripped."""
    return tokenizer.decode(completion.ids, skip_special_tokens=True).strip()
