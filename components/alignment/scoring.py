"""What the evaluation reports about answers besides their correctness, for base, SFT and aligned
models alike: the columns of LMFlow's HH-RLHF table (mean reward from the reward model, distinct-n,
MSTTR, unique words, mean response length) and the verifiable reward of the configured rule.

Held-out prompts only: the evaluation stage calls this on its generations.
"""

from __future__ import annotations

from components.alignment.rewards import RewardFn, load_rule
from components.evaluation.compare import mean_by_task
from components.evaluation.intervals import DEFAULT_RESAMPLES


def msttr(texts: list[str], segment: int = 50) -> float:
    """Mean segmental type-token ratio: the type/token ratio of consecutive `segment`-word windows of all
    answers, averaged (length-independent, unlike plain TTR). NaN when there are fewer words than one window."""
    words = [w.lower() for t in texts for w in t.split()]
    ratios = [len(set(words[i : i + segment])) / segment for i in range(0, len(words) - segment + 1, segment)]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def response_metrics(prompts: list[str], predictions: list[str], references: list[str], tasks: list[str], *,
                     rule: str | None, reward_model: RewardFn | None = None,
                     resamples: int = DEFAULT_RESAMPLES) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Length and diversity of the answers, their verifiable reward (overall with a bootstrap interval,
    and per task as `task/<task>/verifiable_reward`), and the reward model's mean score; and the
    per-answer scores ({"verifiable_reward": [...], "reward_model_score": [...]}, those computed), so
    two models' answers to the same questions can be compared pairwise."""
    if not predictions:
        return {}, {}
    words = [p.split() for p in predictions]
    metrics = {
        "response_words_mean": sum(map(len, words)) / len(words),
        "unique_words": float(len({w.lower() for ws in words for w in ws})),
        "msttr_50": msttr(predictions),
    }
    per_answer: dict[str, list[float]] = {}
    if rule:
        scores = [float(s) for s in load_rule(rule)(prompts, predictions, reference=references, task=tasks)]
        per_answer["verifiable_reward"] = scores
        metrics.update(mean_by_task("verifiable_reward", scores, tasks, resamples=resamples))
    if reward_model is not None:
        scores = [float(s) for s in reward_model(prompts, predictions, reference=references, task=tasks)]
        per_answer["reward_model_score"] = scores
        metrics["reward_model_mean"] = sum(scores) / len(scores)
    return metrics, per_answer
