"""Sampling completions from a policy for RAFT, and the evaluation of aligned models: batched, left-padded,
stopping at the template's end of turn."""

from __future__ import annotations

import torch


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos and the template's end-of-turn token."""
    from components.data.chat_render import prepare_template

    ids = {tokenizer.eos_token_id}
    stop = prepare_template(tokenizer, template).stop_id
    if stop is not None:
        ids.add(stop)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, k: int, temperature: float, top_p: float, max_new_tokens: int,
           eos: list[int], batch_size: int = 16, seed: int | None = None,
           ids: list[list[list[int]]] | None = None) -> tuple[list[list[str]], int]:
    """`k` sampled completions per prompt (decoded without special tokens) and the number of new tokens.

    With `ids` (a list), each prompt's completions as token ids are appended to it, cut after the
    first stop token (kept: training on them teaches where to stop), so a caller can train on exactly
    what was sampled rather than on a re-encoding of the text.
    """
    device = next(model.parameters()).device
    # A seed fixes these samples without reseeding the caller: the global RNG state is restored after.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return _sample(model, tokenizer, prompts, k=k, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, eos=eos, batch_size=batch_size, ids=ids, device=device)


def _sample(model, tokenizer, prompts, *, k, temperature, top_p, max_new_tokens, eos, batch_size, ids, device):
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[str]] = []
    new_tokens = 0
    per_call = max(1, batch_size // k)
    try:
        for i in range(0, len(prompts), per_call):
            enc = tokenizer(prompts[i : i + per_call], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            generated = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, num_return_sequences=k,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            fresh = generated[:, enc["input_ids"].shape[1]:]
            new_tokens += int((~torch.isin(fresh, torch.tensor(eos + [tokenizer.pad_token_id], device=device))).sum())
            texts = [t.strip() for t in tokenizer.batch_decode(fresh, skip_special_tokens=True)]
            out.extend(texts[j : j + k] for j in range(0, len(texts), k))
            if ids is not None:
                rows = [_cut(row.tolist(), eos, tokenizer.pad_token_id) for row in fresh]
                ids.extend(rows[j : j + k] for j in range(0, len(rows), k))
    finally:
        tokenizer.padding_side = side
    return out, new_tokens


def _cut(row: list[int], eos: list[int], pad: int) -> list[int]:
    """Generated ids up to and including the first stop token (or without the trailing pads)."""
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    while row and row[-1] == pad:
        row = row[:-1]
    return row
