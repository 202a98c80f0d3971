"""Sampling completions from a policy for RAFT and for the evaluation's sampled rewards, through the one
generation path (components.models.generation): batched, KV-cached, stopping at the template's end of turn."""

from __future__ import annotations

import torch

from components.data.encoding import encode_texts
from components.models.generation import completion_text, decode


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, k: int, temperature: float, top_p: float, max_new_tokens: int,
           eos: list[int], batch_size: int = 16, seed: int | None = None,
           ids: list[list[list[int]]] | None = None) -> tuple[list[list[str]], int]:
    """`k` sampled completions per prompt (decoded without special tokens) and the number of new tokens
    (stop tokens not counted).

    With `ids` (a list), each prompt's completions as token ids are appended to it, cut after the
    first stop token (kept: training on them teaches where to stop), so a caller can train on exactly
    what was sampled rather than on a re-encoding of the text. A seed fixes the samples with a generator of
    their own; the caller's global random state is left alone.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # The k copies of a prompt form a group of the batch: all but the last prompt token is run once for them.
    repeated = [row for row in encode_texts(tokenizer, prompts) for _ in range(k)]
    completions = decode(model, repeated, max_new_tokens=max_new_tokens, stop=eos, pad_id=pad_id,
                         batch_size=max(batch_size, k), temperature=temperature, top_p=top_p, generator=generator,
                         groups=[j for j in range(len(prompts)) for _ in range(k)])
    texts = [completion_text(tokenizer, c) for c in completions]
    out = [texts[j : j + k] for j in range(0, len(texts), k)]
    if ids is not None:
        ids.extend([c.ids for c in completions[j : j + k]] for j in range(0, len(completions), k))
    return out, sum(len(c.ids) - int(c.stopped) for c in completions)
