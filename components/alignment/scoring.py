"""What the evaluation reports about answers besides their correctness, for base, SFT and aligned
models alike: the columns of LMFlow's HH-RLHF table (mean reward from the reward model, distinct-n,
MSTTR, unique words, mean response length) and the verifiable reward of the configured rule.

Held-out prompts only: the evaluation stage calls this on its generations.
"""

from __future__ import annotations

from components.alignment.rewards import RewardFn, load_rule


def msttr(texts: list[str], segment: int = 50) -> float:
    """Mean segmental type-token ratio: the type/token ratio of consecutive `segment`-word windows of all
    answers, averaged (length-independent, unlike plain TTR). NaN when there are fewer words than one window."""
    words = [w.lower() for t in texts for w in t.split()]
    ratios = [len(set(words[i : i + segment])) / segment for i in range(0, len(words) - segment + 1, segment)]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def response_metrics(prompts: list[str], predictions: list[str], references: list[str], tasks: list[str], *,
                     rule: str | None, reward_model: RewardFn | None = None) -> dict[str, float]:
    """Length and diversity of the answers, their verifiable reward, and the reward model's mean score."""
    if not predictions:
        return {}
    words = [p.split() for p in predictions]
    metrics = {
        "response_words_mean": sum(map(len, words)) / len(words),
        "unique_words": float(len({w.lower() for ws in words for w in ws})),
        "msttr_50": msttr(predictions),
    }
    if rule:
        scores = load_rule(rule)(prompts, predictions, reference=references, task=tasks)
        metrics["verifiable_reward"] = sum(scores) / len(scores)
    if reward_model is not None:
        scores = reward_model(prompts, predictions, reference=references, task=tasks)
        metrics["reward_model_mean"] = sum(scores) / len(scores)
    return metrics
