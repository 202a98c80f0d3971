"""How far an aligned model moved from the model it was aligned from, on held-out prompts.

PPO and GRPO report a KL term while they train, on their own training prompts; RAFT and the preference
methods report none. So the evaluation of the aligned model measures one KL for every method, the same
way: the aligned model answers each held-out prompt greedily, keeping its next-token distributions, and the
reference then reads the same prompts and answers in one pass (components.models.generation); at every
position the aligned model generated (its stop token included) the exact KL(aligned || reference) between
the two next-token distributions is summed over the vocabulary. Reported per answer token (`kl_to_sft`) and summed over an answer
(`kl_to_sft_per_answer`), each answer's figures in its sample and both averaged over answers.

The answers are greedy, not sampled, so this is the divergence along the path the model actually answers
with rather than an unbiased estimate of the sequence-level KL; it is the figure that tells whether the
answers a user gets come from a model still close to SFT.
"""

from __future__ import annotations


def answer_kl(per_position: list[float]) -> dict[str, float]:
    """One answer's KL figures from the KL at each position it generated (none when it generated nothing)."""
    if not per_position:
        return {}
    return {"kl_to_sft": sum(per_position) / len(per_position), "kl_to_sft_per_answer": sum(per_position)}


def kl_metrics(samples: list[dict]) -> dict[str, float]:
    """The answers' KL figures averaged over the samples that carry them."""
    scored = [s for s in samples if "kl_to_sft" in s]
    if not scored:
        return {}
    return {name: sum(s[name] for s in scored) / len(scored) for name in ("kl_to_sft", "kl_to_sft_per_answer")}
