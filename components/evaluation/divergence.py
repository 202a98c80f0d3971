"""How far an aligned model moved from the model it was aligned from, on held-out prompts.

PPO and GRPO report a KL term while they train, on their own training prompts; RAFT and the preference
methods report none. So the evaluation of the aligned model measures one KL for every method, the same
way: on each held-out prompt, over the tokens of the aligned model's own answer (the greedy answer the
evaluation generated), the exact KL(aligned || reference) between the two next-token distributions at
every answer position (the end-of-turn token included), summed over the vocabulary. Reported per answer
token (`kl_to_sft`) and summed over an answer (`kl_to_sft_per_answer`), both averaged over answers.

The answers are greedy, not sampled, so this is the divergence along the path the model actually answers
with rather than an unbiased estimate of the sequence-level KL; it is the figure that tells whether the
answers a user gets come from a model still close to SFT.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def answer_kl(policy, reference, tokenizer, prompts: list[str], answers: list[str], *, end: str = "",
              batch_size: int = 32) -> dict[str, float]:
    """KL(policy || reference) over the answer tokens of (prompt, answer) pairs (module docstring), each
    answer followed by `end` (the template's end of turn: where to stop is part of the answer, and an
    empty answer is then still one position)."""
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    pairs = []
    for prompt, answer in zip(prompts, answers, strict=True):
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = (tokenizer(answer, add_special_tokens=False)["input_ids"] if answer.strip() else []) + end_ids
        if a_ids:
            pairs.append((p_ids, a_ids))
    if not pairs:
        return {}
    policy.eval()
    reference.eval()
    device = next(policy.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_token, per_answer = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        # Left-padded, so every answer ends at the last position and the models need logits (49k columns
        # per position) only for the last `keep` positions, not for the prompts.
        width = max(len(p) + len(a) for p, a in chunk)
        keep = max(len(a) for _, a in chunk) + 1
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, a) in enumerate(chunk):
            ids[row, width - len(p) - len(a) :] = torch.tensor(p + a)
            mask[row, width - len(p) - len(a) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                  "position_ids": positions.to(device), "logits_to_keep": keep}
        logp = torch.log_softmax(policy(**inputs).logits.float(), dim=-1)
        logq = torch.log_softmax(reference(**inputs).logits.float(), dim=-1)
        for row, (_, a) in enumerate(chunk):
            # Kept logit k predicts token width - keep + k + 1: the answer's tokens are the last len(a).
            lp, lq = logp[row, keep - len(a) - 1 : keep - 1], logq[row, keep - len(a) - 1 : keep - 1]
            kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)  # clamp: rounding can leave -1e-9
            per_token.append(float(kl.mean()))
            per_answer.append(float(kl.sum()))
        del logp, logq
    return {"kl_to_sft": sum(per_token) / len(per_token), "kl_to_sft_per_answer": sum(per_answer) / len(per_answer)}
