"""The one reward interface every alignment method and the evaluation use.

A reward is any callable `reward(prompts, completions, **columns) -> list[float]`: one score per
completion, where `columns` holds the dataset's other columns as lists aligned with the prompts
(`reference`, `task`, ...). It is the signature TRL's GRPOTrainer calls reward functions with, so the
same function serves RAFT, PPO, GRPO and the evaluation. Backends:

- a rule: a verifiable function named by a dotted path (`components.alignment.icd10:icd10_reward`);
- the learned reward model of the reward stage (`RewardModel`);
- an HTTP endpoint (`HttpReward`): POST {"prompts", "completions", "columns"} -> {"rewards": [...]}.

`build_reward` sums the configured ones with their weights and keeps each part for the logs.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import TransientError

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


class RewardError(ValueError):
    """A reward backend that cannot be loaded or answered nonsense; the message says which and why."""


def load_rule(path: str) -> RewardFn:
    """The callable named by `module:function` (or `module.function`)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardError(f"reward rule {path!r} is not a dotted path 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward rule {path!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward rule {path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def check_scores(scores: Any, n: int, source: str) -> list[float]:
    """A backend's answer as n finite floats, or a RewardError naming the backend."""
    if not isinstance(scores, Sequence) or isinstance(scores, (str, bytes)) or len(scores) != n:
        got = f"{len(scores)} values" if isinstance(scores, Sequence) else type(scores).__name__
        raise RewardError(f"reward {source} returned {got} for {n} completions; it must return one float each")
    out = []
    for i, s in enumerate(scores):
        try:
            value = float(s)
        except (TypeError, ValueError):
            raise RewardError(f"reward {source}: score {i} is {s!r}, not a number") from None
        if not math.isfinite(value):
            raise RewardError(f"reward {source}: score {i} is {value}; rewards must be finite")
        out.append(value)
    return out


def _json_columns(columns: dict[str, Any]) -> dict[str, list]:
    """The columns an endpoint can receive: lists of JSON values (TRL also passes tensors and its state)."""
    simple = (str, int, float, bool, type(None))
    return {k: v for k, v in columns.items()
            if isinstance(v, list) and all(isinstance(x, simple) for x in v)}


@dataclass
class HttpReward:
    """A reward served over HTTP. Connection failures and 5xx answers are transient (retried by the stage)."""

    url: str
    timeout_s: float = 30.0

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        import httpx

        from components.redact import redact_uri

        payload = {"prompts": list(prompts), "completions": list(completions), "columns": _json_columns(columns)}
        shown = redact_uri(self.url)
        try:
            response = httpx.post(self.url, json=payload, timeout=self.timeout_s)
        except httpx.TransportError as exc:
            raise TransientError(f"reward endpoint {shown} unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise TransientError(f"reward endpoint {shown} answered {response.status_code}")
        if response.status_code != 200:
            raise RewardError(f"reward endpoint {shown} answered {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError:
            raise RewardError(f"reward endpoint {shown} did not answer JSON") from None
        if not isinstance(body, dict) or "rewards" not in body:
            raise RewardError(f"reward endpoint {shown} must answer {{\"rewards\": [...]}}")
        return check_scores(body["rewards"], len(completions), f"endpoint {shown}")


@dataclass
class CombinedReward:
    """A weighted sum of named reward functions; `parts` gives each one's scores for the logs."""

    parts: list[tuple[str, float, RewardFn]] = field(default_factory=list)
    last_parts: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def __name__(self) -> str:  # TRL names the reward in its logs after the function
        return "+".join(name for name, _, _ in self.parts) or "reward"

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        if not self.parts:
            raise RewardError("no reward configured: set alignment.reward.rule, model_weight or http_url")
        total = [0.0] * len(completions)
        self.last_parts = {}
        for name, weight, fn in self.parts:
            scores = check_scores(fn(prompts, completions, **columns), len(completions), name)
            self.last_parts[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total


def build_reward(cfg, *, reward_model: RewardFn | None = None, without_model: bool = False) -> CombinedReward:
    """The configured reward (components.config.RewardFunctionConfig); `reward_model` when model_weight > 0.
    `without_model`: the other parts only (PPO scores with the reward adapter on its own shared model)."""
    parts: list[tuple[str, float, RewardFn]] = []
    if cfg.rule:
        parts.append(("rule", cfg.rule_weight, load_rule(cfg.rule)))
    if cfg.model_weight > 0 and not without_model:
        if reward_model is None:
            raise RewardError("alignment.reward.model_weight > 0 needs the reward stage's model (reward.enabled)")
        parts.append(("model", cfg.model_weight, reward_model))
    if cfg.http_url:
        parts.append(("http", cfg.http_weight, HttpReward(cfg.http_url, cfg.http_timeout_s)))
    return CombinedReward(parts)


def is_degenerate(text: str) -> bool:
    """Empty, or a loop: a short phrase repeated back to back, or a long answer with few distinct words."""
    words = text.split()
    if not words:
        return True
    for n in (1, 2, 3):
        for i in range(len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return True
    return len(words) >= 8 and len(set(words)) / len(words) < 0.3


class RewardModel:
    """The reward stage's model as a reward function: the SFT model (base + adapter stack merged) as a
    sequence classifier with the reward adapter and its score head, scoring prompt + completion. A caller
    that holds that merged model already (`policy`: the same base and stack, loaded for inference) saves
    the load: the classifier is made from a copy of it."""

    def __init__(self, base, below: list[Path], reward_adapter: Path, hardware, tokenizer, *, stop: str | None,
                 max_length: int = 256, batch_size: int = 8, policy=None):
        self.model = shared_reward_model(base, below, reward_adapter, hardware, tokenizer.pad_token_id, policy=policy)
        self.tokenizer, self.stop, self.max_length, self.batch_size = tokenizer, stop or "", max_length, batch_size
        self.device = hardware.device
        self.cut_rows = 0  # prompts cut from the left to fit max_length (score_answers), over every call

    def __call__(self, prompts: list[str], completions: list[str], *, task: list[str] | None = None, **_) -> list[float]:
        """Each completion's score. A pair this (kept, inference-only) model scored before, at the same
        max_length, is not scored again: the aligned model's held-out answers are mostly the SFT model's."""
        memo = self.model.__dict__.setdefault("_lmforge_scored", {})  # (prompt, answer, max_length) -> (score, cut)
        pairs = [(p, c + self.stop, self.max_length) for p, c in zip(prompts, completions, strict=True)]
        todo = [pair for pair in dict.fromkeys(pairs) if pair not in memo]
        if todo:
            label = dict(zip(pairs, task, strict=True)) if task else None  # a pair's task: batches keep to one
            scores, cut = _score_pairs(self.model, self.tokenizer, [p for p, _, _ in todo], [a for _, a, _ in todo],
                                       max_length=self.max_length, batch_size=self.batch_size,
                                       groups=[label[pair] for pair in todo] if label else None)
            memo.update({pair: (score, flag) for pair, score, flag in zip(todo, scores, cut, strict=True)})
        self.cut_rows += sum(memo[pair][1] for pair in pairs)
        return [memo[pair][0] for pair in pairs]


def load_classifier(base, below: list[Path], hardware, pad_token_id: int | None, policy=None):
    """The policy's model (base + adapter stack merged) as a one-output sequence classifier; the score
    head starts random (normal, the config's initializer_range, as transformers initialises it). The stack's
    adapters are causal-LM adapters, so they are merged into the causal model, and its body becomes the
    classifier's body (same modules, same names). The classifier is built on the meta device and only its
    head is made: a full random initialisation of the 135M demo model costs seconds that are thrown away.
    With `policy` (that merged causal model, loaded already) a copy of it is taken instead of loading."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from components.models.loading import load_with_adapters

    causal = (copy.deepcopy(policy) if policy is not None
              else load_with_adapters(base.source, below, hardware, **base.load_kwargs()))
    config = AutoConfig.from_pretrained(base.source, num_labels=1, **base.load_kwargs())
    config.pad_token_id = pad_token_id
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=hardware.dtype,
                                                               trust_remote_code=base.trust_remote_code)
    setattr(model, model.base_model_prefix, getattr(causal, causal.base_model_prefix))
    head = model.score.to_empty(device=hardware.device)
    torch.nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    unmade = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unmade:
        raise RuntimeError(f"{type(model).__name__}: parts of the classifier were not made from the causal model "
                           f"{type(causal).__name__}: {unmade[:5]}")
    del causal
    return model.to(hardware.device)


def shared_reward_model(base, below: list[Path], reward_adapter: Path, hardware, pad_token_id: int | None,
                        policy=None):
    """load_reward_model, kept for the next caller in this process (components.models.loading.kept_model):
    the evaluate nodes of a run score with the same reward model. Only ever used for inference."""
    from components.models.loading import content_stamp, kept_model

    key = (str(base.source), content_stamp([*below, reward_adapter]), hardware.device, hardware.precision,
           pad_token_id)
    return kept_model("reward", key, hardware.device,
                      lambda: load_reward_model(base, below, reward_adapter, hardware, pad_token_id, policy=policy))


def load_reward_model(base, below: list[Path], reward_adapter: Path, hardware, pad_token_id: int | None = None,
                      policy=None):
    """The reward stage's model: the classifier with the reward adapter (LoRA + score head) merged, in eval mode."""
    from peft import PeftModel

    model = load_classifier(base, below, hardware, pad_token_id, policy=policy)
    return PeftModel.from_pretrained(model, str(reward_adapter)).merge_and_unload().eval()


def score_answers(model, tokenizer, prompts: list[str], answers: list[str], *, max_length: int,
                  batch_size: int, groups: list | None = None) -> tuple[list[float], int]:
    """The classifier's scalar for each prompt + answer, and how many prompts had to be cut to fit.

    A pair longer than `max_length` tokens loses the start of its prompt, never its answer (cut from the right,
    a long prompt would leave no answer to score and every sample would score the same); an answer longer than
    `max_length` alone keeps its first `max_length` tokens. Pairs are scored in the order given, `batch_size`
    at a time, each batch's shared prompt prefix encoded once (components.models.generation); with `groups`
    (a label per pair, a task), a batch never spans two runs of labels, so each shares its own. The head reads
    the last token that is not the pad token, the position transformers' sequence classifiers pool, which
    training used.
    """
    scores, cut = _score_pairs(model, tokenizer, prompts, answers, max_length=max_length, batch_size=batch_size,
                               groups=groups)
    return scores, sum(cut)


def _score_pairs(model, tokenizer, prompts: list[str], answers: list[str], *, max_length: int, batch_size: int,
                 groups: list | None) -> tuple[list[float], list[bool]]:
    """score_answers, with whether each pair's prompt was cut."""
    from components.data.encoding import encode_texts
    from components.models.generation import segments_of

    rows, cut = [], []
    for p_ids, a_ids in zip(encode_texts(tokenizer, prompts), encode_texts(tokenizer, answers), strict=True):
        room = max(max_length - len(a_ids), 0)
        cut.append(len(p_ids) > room)
        if cut[-1]:
            p_ids = p_ids[len(p_ids) - room :] if room else []
        rows.append((p_ids + a_ids)[:max_length])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    scores: list[float] = []
    for segment in segments_of(groups, len(rows)):
        for start in range(segment.start, segment.stop, batch_size):
            scores += _score_rows(model, rows[start : min(start + batch_size, segment.stop)], pad)
    return scores, cut


def _score_rows(model, rows: list[list[int]], pad_id: int) -> list[float]:
    """One batch of token rows through the classifier's body (shared prefix once, tails padded on the left
    of their own part) and its head at each row's pooled position."""
    import torch
    from transformers import DynamicCache

    from components.models.generation import shared_prefix, tail_batch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT-wrapped classifier too
    body, head = getattr(inner, inner.base_model_prefix), inner.score
    device = next(model.parameters()).device
    rows = [r if r else [pad_id] for r in rows]
    prefix = shared_prefix(rows, 1)
    cache = DynamicCache()
    n = len(rows)
    with torch.no_grad():
        prefix_hidden = None
        if prefix:
            prefix_hidden = body(input_ids=torch.tensor([rows[0][:prefix]], device=device), cache=cache,
                                 use_cache=True).last_hidden_state[0]
            cache.batch_repeat_interleave(n)
        ids, mask, positions = tail_batch(rows, prefix, pad_id)
        width = ids.shape[1]
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                      cache=cache if prefix else None, use_cache=bool(prefix)).last_hidden_state
        pooled = []
        for b, row in enumerate(rows):
            real = [i for i, token in enumerate(row) if token != pad_id]
            at = real[-1] if real else len(row) - 1
            if at >= prefix:  # in the row's own part: tail coordinates are right-aligned
                pooled.append(hidden[b, width - (len(row) - at)])
            else:
                pooled.append(prefix_hidden[at])
        return head(torch.stack(pooled)).float()[:, 0].tolist()
