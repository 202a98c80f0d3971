"""What one PPO step computes on the shared model (components/training/ppo.py runs the loop).

The roles as adapters on one base model (policy adapter, reference = adapters off, frozen reward
adapter + score head, value head), the forward passes that score responses under them, sampling,
rollouts, and the PPO math: per-token KL rewards, GAE, whitening, clipped losses, the KL controller.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.models.loss import plain_head_logits

POLICY = "policy"
RewardFn = Callable[..., list[float]]


@dataclass
class PPOSettings:
    """PPO knobs. Field comments are the documentation (components.config mirrors them)."""

    steps: int = 20  # PPO steps (each: one batch of rollouts, then ppo_epochs passes over it)
    batch_size: int = 8  # prompts per step
    mini_batch_size: int = 4  # rollouts per optimizer step (also the chunk size of no-grad forwards)
    ppo_epochs: int = 2  # passes over each batch of rollouts
    learning_rate: float = 5e-5  # AdamW over the policy LoRA
    weight_decay: float = 0.0  # the policy LoRA's; the value head takes none
    value_learning_rate: float | None = None  # the value head's own rate; None: learning_rate
    lr_scheduler: str = "constant"  # a transformers schedule name, over every optimizer step of the run
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty to the reference
    adaptive_kl: bool = False  # adapt kl_coef toward target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # with adaptive_kl: target KL per sequence (nats, summed over response tokens)
    kl_horizon: int = 10000  # with adaptive_kl: rollouts over which the coefficient adapts
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value prediction clip, around the rollout's value
    vf_coef: float = 0.1  # weight of the value loss
    whiten_advantages: bool = True
    temperature: float = 1.0  # sampling temperature (the logprobs use the same one)
    top_p: float = 1.0
    max_new_tokens: int = 24
    stop_ids: tuple[int, ...] = ()  # tokens that end an answer besides the EOS: the template's end of turn, which
    # evaluation and RAFT stop at too (components.models.generation.stop_ids)
    max_prompt_length: int = 512  # longer prompts keep their last tokens
    reward_suffix: str | None = None  # text the reward model saw after each answer (e.g. "<|im_end|>\n");
    # set: the EOS is dropped and this appended before the reward adapter scores; None: scored as generated
    max_kl: float | None = None  # stop (keeping the last good state) when the KL per sequence exceeds this
    missing_eos_penalty: float | None = None  # subtracted from the score of an answer cut at max_new_tokens
    save_steps: int = 10  # checkpoint every N steps
    save_total_limit: int = 2  # complete checkpoints kept
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # stored in the adapter config; PPO itself runs without dropout
    lora_target_modules: str | list[str] = "all-linear"  # or explicit module names
    lora_use_rslora: bool = False  # scale by alpha / sqrt(r)
    lora_use_dora: bool = False  # DoRA: magnitude apart from direction (the reference stays the unchanged base)

    def __post_init__(self):
        problems = []
        if self.temperature <= 0:
            problems.append("temperature must be > 0 (PPO samples)")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "save_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.max_kl is not None and self.max_kl <= 0:
            problems.append("max_kl must be > 0 or None")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            problems.append("missing_eos_penalty must be >= 0 or None")
        if problems:
            raise ValueError("invalid PPOSettings: " + "; ".join(problems))


# ---------------------------------------------------------------- adapters on one model

@contextlib.contextmanager
def _requires_grad_kept(model) -> Iterator[None]:
    """Restore every parameter's requires_grad flag on exit (PEFT's adapter switches flip them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def use_adapter(peft_model, name: str) -> Iterator[None]:
    """Make adapter `name` the active one for the block, then the previous one again.

    Frozen adapters stay frozen and trainable ones trainable: PEFT's set_adapter makes the adapter it
    activates trainable, so every requires_grad flag is put back, at entry and at exit.
    """
    previous = peft_model.active_adapter
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]

    def restore_flags():
        for p, flag in flags:
            p.requires_grad_(flag)

    peft_model.set_adapter(name)
    restore_flags()
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        restore_flags()


@contextlib.contextmanager
def reference_policy(peft_model) -> Iterator[None]:
    """The base model (every adapter off) for the block: the reference policy. Flags kept."""
    with _requires_grad_kept(peft_model), peft_model.disable_adapter():
        yield


def build_policy_model(base_model, settings: PPOSettings):
    """Wrap `base_model` (modified in place) with a fresh trainable LoRA adapter named "policy", built by the
    one LoRA builder (methods.lora_config) from the settings' lora_* fields."""
    from peft import get_peft_model

    from components.config import LoraSettings
    from components.training.methods import lora_config

    lora = LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                        target_modules=settings.lora_target_modules, use_rslora=settings.lora_use_rslora,
                        use_dora=settings.lora_use_dora)
    return get_peft_model(base_model, lora_config(lora), adapter_name=POLICY)


@dataclass
class RewardAdapter:
    """A frozen LoRA adapter on the shared model plus the score head that reads its last hidden state."""

    name: str
    score: nn.Linear
    pad_token_id: int | None


_SCORE_KEY = re.compile(r"(?:^|\.)score\.(?:modules_to_save\.[^.]+\.)?(weight|bias)$")


def attach_reward_adapter(peft_model, reward_adapter_dir: Path, name: str = "reward", *,
                          pad_token_id: int | None = None) -> RewardAdapter:
    """Load a sequence-classification LoRA adapter (PEFT task SEQ_CLS, num_labels=1, as TRL's
    RewardTrainer saves it) into `peft_model` as the frozen adapter `name`, and its `score` head.

    The LoRA weights fit the base's linear layers (a SEQ_CLS model has the causal LM's decoder); the score
    head comes from `score.weight` in the adapter's safetensors. Scores then equal the standalone
    classifier's (the last non-pad token's hidden state through the head). The active adapter is unchanged.
    """
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    reward_adapter_dir = Path(reward_adapter_dir)
    weights_file = reward_adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"reward adapter {reward_adapter_dir} has no adapter_model.safetensors; "
                                "is it the reward stage's reward_adapter/ directory?")
    config = PeftConfig.from_pretrained(str(reward_adapter_dir))
    if config.peft_type != "LORA":  # PeftType is a str enum
        raise ValueError(f"reward adapter {reward_adapter_dir} is {config.peft_type}, not LoRA")
    weights = load_file(str(weights_file))
    score_weights = {m.group(1): v for k, v in weights.items() if (m := _SCORE_KEY.search(k))}
    if "weight" not in score_weights:
        raise ValueError(f"reward adapter {reward_adapter_dir} holds no score head (score.weight); train it as "
                         "a sequence classifier (task_type SEQ_CLS, modules_to_save=['score'])")
    if score_weights["weight"].shape[0] != 1:
        raise ValueError(f"reward adapter {reward_adapter_dir}: score head has {score_weights['weight'].shape[0]} "
                         "outputs; a reward model has num_labels=1")

    config = copy.deepcopy(config)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    with _requires_grad_kept(peft_model):
        peft_model.add_adapter(name, config)
        lora = {k: v for k, v in weights.items() if not _SCORE_KEY.search(k)}
        result = set_peft_model_state_dict(peft_model, lora, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if f".{name}." in k or "lora_" in k]
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if unexpected or missing:
        raise ValueError(f"reward adapter {reward_adapter_dir} does not fit this model: "
                         f"unexpected {unexpected[:3]}, missing {missing[:3]}; was it trained on the same base?")
    for n, p in peft_model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)

    hidden = score_weights["weight"].shape[1]
    head = nn.Linear(hidden, 1, bias="bias" in score_weights)
    with torch.no_grad():
        head.weight.copy_(score_weights["weight"].float())
        if "bias" in score_weights:
            head.bias.copy_(score_weights["bias"].float())
    head.requires_grad_(False)
    head.to(next(peft_model.parameters()).device)
    if pad_token_id is None:
        pad_token_id = peft_model.get_base_model().config.pad_token_id
    return RewardAdapter(name=name, score=head, pad_token_id=pad_token_id)


class ValueHead(nn.Module):
    """V(s_t): one linear layer on the policy's last hidden state, kept in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


# ---------------------------------------------------------------- forward passes

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (as generate computes them), so a padded row scores like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    """Last hidden state (after the final norm) of the decoder body, every position."""
    body = causal_lm(model).base_model
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False).last_hidden_state


def response_forward(model, query, query_mask, response, response_mask, *, temperature: float,
                     value_head: ValueHead | None = None, entropy: bool = False):
    """Per-token logprobs of `response` given `query` under `model` (a causal LM, PEFT-wrapped or not, in
    its current adapter state), the values V(s_t) before each response token, and the mean entropy.

    Queries are left-padded, responses right-padded; padded positions get logprob 0 and value 0. Only the
    response positions go through the LM head when the model's logits are a plain head on the hidden state.
    """
    input_ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    start, causal = query.shape[1], causal_lm(model)
    if plain_head_logits(causal):
        hidden = decoder_hidden(model, input_ids, mask)[:, start - 1 : -1]
        logits = causal.get_output_embeddings()(hidden)
    else:
        out = causal(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                     output_hidden_states=value_head is not None)
        logits = out.logits[:, start - 1 : -1]
        hidden = out.hidden_states[-1][:, start - 1 : -1] if value_head is not None else None
    logits = logits.float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    keep = response_mask.bool()
    logprobs = torch.where(keep, logp_all.gather(-1, response.unsqueeze(-1)).squeeze(-1), 0.0)
    values = torch.where(keep, value_head(hidden), 0.0) if value_head is not None else None
    ent = None
    if entropy:
        per_token = -(logp_all.exp() * logp_all).sum(-1)
        ent = masked_mean(per_token, keep)
    return logprobs, values, ent


def reward_adapter_scores(peft_model, reward: RewardAdapter, input_ids, attention_mask) -> torch.Tensor:
    """The reward adapter's score of each row: its score head on the last real (non-pad) token, as
    transformers' *ForSequenceClassification reads it."""
    with torch.no_grad(), use_adapter(peft_model, reward.name):
        hidden = decoder_hidden(peft_model, input_ids, attention_mask)
    real = attention_mask.bool()
    if reward.pad_token_id is not None:
        real &= input_ids != reward.pad_token_id
    last = (torch.arange(input_ids.shape[1], device=input_ids.device) * real).argmax(-1)
    return reward.score(hidden[torch.arange(len(last), device=last.device), last].float()).squeeze(-1)




def generate(model, query, query_mask, settings: PPOSettings, *, eos_ids: set[int], pad_token_id: int):
    """Sample responses (temperature, top_p, no other warper) from `model` in its current adapter state,
    through the one generation path (components.models.generation), each cut after its first stop token.
    Returns (response, mask), right-padded to the longest response."""
    from components.models.generation import decode

    rows = [q[m.bool()].tolist() for q, m in zip(query.cpu(), query_mask.cpu())]
    with torch.no_grad():
        completions = decode(model, rows, max_new_tokens=settings.max_new_tokens, stop=sorted(eos_ids),
                             pad_id=pad_token_id, batch_size=len(rows), temperature=settings.temperature,
                             top_p=settings.top_p)
    width = max(max(len(c.ids) for c in completions), 1)
    response = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, c in enumerate(completions):
        response[i, : len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
        mask[i, : len(c.ids)] = 1
    return response.to(query.device), mask.to(query.device)


# ---------------------------------------------------------------- rollouts

def eos_token_ids(tokenizer, model) -> set[int]:
    """Every token id that ends a response: the tokenizer's EOS and the generation config's."""
    ids = set()
    for e in (tokenizer.eos_token_id, causal_lm(model).generation_config.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(int(x) for x in e)
    if not ids:
        raise ValueError("the tokenizer and the model's generation_config name no EOS token; PPO cuts responses at it")
    return ids


def reward_inputs(query, query_mask, response, response_mask, eos_ids, suffix_ids, pad_token_id):
    """Prompt + response as the reward model reads it: as generated, or with the EOS replaced by a suffix."""
    if not suffix_ids:
        return torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    lengths = response_mask.sum(-1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        ids = response[i, :n].tolist()
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        rows.append(ids + suffix_ids)
    width = max(len(r) for r in rows)
    resp = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=query.device)
    mask = torch.zeros_like(resp)
    for i, r in enumerate(rows):
        resp[i, : len(r)] = torch.tensor(r, device=query.device)
        mask[i, : len(r)] = 1
    return torch.cat([query, resp], 1), torch.cat([query_mask, mask], 1)


def chunks(n: int, size: int) -> list[slice]:
    """Slices of at most `size` rows over `n` (minibatches, and no-grad forwards of bounded memory)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def scores_from_fn(reward_fn, prompts, completions, completion_ids, rows) -> list[float]:
    """`reward_fn`'s score of each completion, the prompt rows' other fields passed as keyword lists;
    a None score becomes NaN (the loop stops on it)."""
    columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt"})}
    scores = reward_fn(prompts, completions, completion_ids=completion_ids, **columns)
    scores = list(scores) if scores is not None else []
    if len(scores) != len(prompts):
        raise ValueError(f"reward_fn returned {len(scores)} scores for {len(prompts)} completions")
    return [float("nan") if s is None else float(s) for s in scores]


@dataclass
class Rollout:
    """One batch of sampled responses and what every role said about them (no gradients)."""

    query: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # (B, R) right-padded, cut after the first EOS
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # (B, R) under the policy
    ref_logprobs: torch.Tensor  # (B, R) under the reference (adapters off)
    values: torch.Tensor  # (B, R) V(s_t) from the value head
    entropy: float  # mean per-token entropy of the policy
    generate_seconds: float


def rollout(peft_model, value_head, query, query_mask, settings: PPOSettings, *, eos_ids: set[int],
            pad_token_id: int) -> Rollout:
    """Sample with the policy, then score the responses under the policy (+ value head) and the reference."""
    t0 = time.perf_counter()
    response, response_mask = generate(peft_model, query, query_mask, settings, eos_ids=eos_ids,
                                       pad_token_id=pad_token_id)
    generate_seconds = time.perf_counter() - t0
    logprobs, ref_logprobs, values, entropy_sum = [], [], [], 0.0
    with torch.no_grad():
        for s in chunks(len(query), settings.mini_batch_size):
            args = (query[s], query_mask[s], response[s], response_mask[s])
            lp, v, ent = response_forward(peft_model, *args, temperature=settings.temperature, value_head=value_head,
                                          entropy=True)
            with reference_policy(peft_model):
                ref, _, _ = response_forward(peft_model, *args, temperature=settings.temperature)
            logprobs.append(lp), values.append(v), ref_logprobs.append(ref)
            entropy_sum += float(ent) * int(response_mask[s].sum())
    return Rollout(query, query_mask, response, response_mask, torch.cat(logprobs), torch.cat(ref_logprobs),
                   torch.cat(values), entropy_sum / max(int(response_mask.sum()), 1), generate_seconds)


# ---------------------------------------------------------------- PPO math

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set (0 when none is)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8), mean and (population) variance over the masked positions of the whole
    batch; the mean is not added back (whitened advantages have mean 0). Masked-out positions become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - logp_ref), plus the score on each response's last token.
    Returns (rewards, per-token kl)."""
    kl = torch.where(mask.bool(), logprobs - ref_logprobs, 0.0)
    rewards = -kl_coef * kl
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(last), device=last.device), last] += scores
    return rewards, kl


def penalise_missing_eos(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """TRL's missing_eos_penalty: `penalty` subtracted from the score of each answer that did not finish
    (`finished` False: it ran to max_new_tokens without a stop token); None leaves the scores as they are."""
    if penalty is None:
        return scores
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens (Schulman et al. 2016), right-padded rows.

    A response is a finished episode: the value after its last token is 0 (no bootstrap), whatever
    `values` holds on the padding. Rewards and values at padded positions are ignored, and padded
    positions get advantage 0. Returns (advantages, returns = advantages + values)."""
    values = torch.where(mask.bool(), values, 0.0)
    rewards = torch.where(mask.bool(), rewards, 0.0)
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = torch.where(mask.bool(), advantages, 0.0)
    return advantages, advantages + values


def ppo_losses(new_logprobs, new_values, old_logprobs, old_values, advantages, returns, mask, settings: PPOSettings):
    """Clipped policy loss and clipped value loss (token means), and their diagnostics."""
    keep = mask.bool()
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - settings.cliprange, 1 + settings.cliprange)
    policy_loss = masked_mean(torch.max(pg1, pg2), keep)
    v_clipped = old_values + (new_values - old_values).clamp(-settings.cliprange_value, settings.cliprange_value)
    vf1, vf2 = (new_values - returns) ** 2, (v_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf1, vf2), keep)
    with torch.no_grad():
        stats = {
            "clip_fraction": float(masked_mean((pg2 > pg1).float(), keep)),
            "value_clip_fraction": float(masked_mean((vf2 > vf1).float(), keep)),
            "approx_kl": float(0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, keep)),
        }
    return policy_loss, value_loss, stats


def next_kl_coef(kl_coef: float, kl: float, n: int, settings: PPOSettings) -> float:
    """Ziegler et al.'s adaptive controller: move the coefficient by at most 20% x n / horizon toward target."""
    if not settings.adaptive_kl:
        return kl_coef
    error = min(max(kl / settings.target_kl - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / settings.kl_horizon)
